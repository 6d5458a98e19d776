"""LIP as a plug-in of a training loop: `lip_cli.integrations.lightning.LipCallback` (extra
`lip-cli[lightning]`) and `lip_cli.integrations.transformers.LipTrainerCallback` (extra
`lip-cli[hf]`). Each module imports its framework; this package imports neither.
"""

from __future__ import annotations

from lip_cli.errors import LipError


def missing_framework(module: str, package: str, extra: str) -> LipError:
    """The one line an integration raises when its framework is not installed."""
    return LipError(f"{module} needs {package}, which is not installed: pip install 'lip-cli[{extra}]'")
