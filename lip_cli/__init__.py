"""lip: repair the classifier layer of a model trained on noisy labels (PSP + LAP).

The Python API, usable inside a training script:

    from lip_cli import LapStatistics, repair, lip_repair, collect_features

Names are imported on first use so that `import lip_cli` (and the `lip` command's start-up) does
not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LipError": "lip_cli.errors",
    "HeadSVD": "lip_cli.lip",
    "head_svd": "lip_cli.lip",
    "LapStatistics": "lip_cli.lip",
    "RepairedHead": "lip_cli.lip",
    "repair": "lip_cli.lip",
    "lip_repair": "lip_cli.lip",
    "singular_values_for_k": "lip_cli.lip",
    "count_correct": "lip_cli.lip",
    "collect_features": "lip_cli.collect",
    "RepairRequest": "lip_cli.jobs.repair",
    "RepairReport": "lip_cli.jobs.repair",
    "repair_checkpoint": "lip_cli.jobs.repair",
    "effective_rank": "lip_cli.spectra",
    "stable_rank": "lip_cli.spectra",
    "subspace_similarity": "lip_cli.spectra",
    "principal_angles": "lip_cli.spectra",
    "match_vectors": "lip_cli.spectra",
    "compare_series": "lip_cli.jobs.compare",
    "parse_threshold": "lip_cli.gate",
    "read_baseline": "lip_cli.baseline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lip_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
