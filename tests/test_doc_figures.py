"""Figures of the docs that follow from lip's own constants, recomputed: the sampling error of an
accuracy curve, the fewest validation rows a confirmation needs, the size of the benchmark cache.
(Figures of runs are generated from saved results: tests/test_docs.py checks those pages.)"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

from lip_cli import selection
from lip_cli.commands import repair as repair_command
from lip_cli.statistics_pass import SAMPLE_ROWS

ROOT = Path(__file__).resolve().parent.parent


def prose(name: str) -> str:
    """A page with its line breaks and indents folded into single spaces."""
    return " ".join((ROOT / name).read_text().split())


def test_repair_page_sampling_error_follows_the_sample_size() -> None:
    text = prose("docs/repair.md")
    assert f"`--sample-rows` ({SAMPLE_ROWS:,}) training rows" in text
    found = re.search(
        r"An accuracy on ([\d,]+) rows has a standard error of at most ([\d.]+) points "
        r"\(0\.5 / sqrt\((\d+)\)\)",
        text,
    )
    assert found, "docs/repair.md: the standard error sentence is gone"
    rows, error, under_root = int(found.group(1).replace(",", "")), found.group(2), int(found.group(3))
    assert rows == under_root == SAMPLE_ROWS
    assert error == f"{100 * 0.5 / math.sqrt(SAMPLE_ROWS):.2f}"
    found = re.search(r"sqrt\(d / (\d+)\) for a share d .*?: ([\d.]+) points at d = ([\d.]+)%", text)
    assert found, "docs/repair.md: the paired standard error sentence is gone"
    assert int(found.group(1)) == SAMPLE_ROWS
    assert found.group(2) == f"{100 * math.sqrt(float(found.group(3)) / 100 / SAMPLE_ROWS):.2f}"
    bound = re.search(r"standard error <= ([\d.]+) points", repair_command.DETAILS["--sample-rows"])
    assert bound and float(bound.group(1)) == round(100 * 0.5 / math.sqrt(SAMPLE_ROWS), 1)


def test_repair_page_chunk_and_sample_defaults_are_the_commands() -> None:
    text = prose("docs/repair.md")
    defaults = inspect.signature(repair_command.repair).parameters
    chunk = re.search(r"read in chunks of `--chunk-rows` \((\d+)\)", text)
    assert chunk and int(chunk.group(1)) == defaults["chunk_rows"].default
    assert defaults["sample_rows"].default in (None, SAMPLE_ROWS)


def test_repair_page_fewest_rows_are_what_auto_demands() -> None:
    found = re.search(
        r"needs at least (\d+) rows at alpha ([\d.]+) \((\d+) at ([\d.]+)\)", prose("docs/repair.md")
    )
    assert found, "docs/repair.md: the fewest-rows sentence is gone"
    assert int(found.group(1)) == selection.minimum_rows(float(found.group(2)))
    assert int(found.group(3)) == selection.minimum_rows(float(found.group(4)))


def test_benchmark_cache_size_is_its_shape() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import SHAPES

    full = SHAPES["imagenet-full"]
    found = re.search(r"ImageNet-1k-size float16 cache, ([\d.]+) GB of scratch", prose("docs/layout.md"))
    assert found and full["dtype"] == "float16"
    assert found.group(1) == f"{full['n'] * full['q'] * 2 / 1e9:.1f}"


def test_readme_fit_time_is_the_saved_full_size_run() -> None:
    """README: "an ImageNet-size cache (1.28 million rows) takes under 30 s", from benchmarks/speed.json."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import SHAPES

    sentence = r"an ImageNet-size cache \(([\d.]+) million rows\) takes under (\d+) s"
    found = re.search(sentence, prose("README.md"))
    assert found, "README.md: the fit-time sentence is gone"
    assert found.group(1) == f"{SHAPES['imagenet-full']['n'] / 1e6:.2f}"
    saved = json.loads((ROOT / "benchmarks" / "speed.json").read_text())["results"]["imagenet-full"]
    assert max(saved["k"]["seconds"], saved["auto"]["seconds"]) < int(found.group(2))


def test_features_overhead_is_the_saved_run() -> None:
    """docs/features.md's overhead of `collect_features` is benchmarks/RESULTS.md's features section."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    ratio = re.search(r"lip features / plain loop: ([\d.]+)x the time", results)
    found = re.search(r"\(ResNet-50, (\d+) images, CPU\): ([\d.]+)x the time", prose("docs/features.md"))
    assert ratio and found
    assert found.group(2) == f"{float(ratio.group(1)):.2f}"
    assert f"--images {found.group(1)}" in results


def test_pickle_bounds_in_the_docs_are_the_walks() -> None:
    """docs/formats.md and docs/safety.md name the walk's bounds; they are torch_pickle's constants, and
    the bomb tests build the depth the page names."""
    from lip_cli.torch_pickle import MAX_PICKLE_BYTES, MAX_VALUES

    formats, safety = prose("docs/formats.md"), prose("docs/safety.md")
    mib = MAX_PICKLE_BYTES // 2**20
    assert f"the pickle by {mib} MiB, the values it holds by {MAX_VALUES:,}" in formats
    assert f"({mib} MiB of pickle, {MAX_VALUES:,} values held)" in safety
    depth = re.search(r"(\d+) levels of shared lists", formats)
    assert depth and f"for _ in range({depth.group(1)}):" in (ROOT / "tests" / "test_bombs.py").read_text()


def test_readme_demo_description_is_the_demos_defaults() -> None:
    from lip_cli.demo import DemoSettings

    settings = DemoSettings()
    sentence = r"trains a small MLP on a (\d+)-class problem with (\d+)% label noise"
    found = re.search(sentence, prose("README.md"))
    assert found, "README.md: the demo sentence is gone"
    assert int(found.group(1)) == settings.classes
    assert int(found.group(2)) == round(100 * settings.noise_rate)
    callbacks = (ROOT / "docs" / "callbacks.md").read_text()
    assert f"# train: {round(100 * settings.noise_rate)}% of them noisy" in callbacks


def test_repair_page_grid_sizes_are_the_grids() -> None:
    """docs/repair.md: "every k (up to 64 of them, else 65 spread out ...)" and "the best of 65"."""
    text = prose("docs/repair.md")
    found = re.search(r"at every k \(up to (\d+) of them, else (\d+) spread out", text)
    assert found, "docs/repair.md: the grid sentence is gone"
    every, spread = int(found.group(1)), int(found.group(2))
    assert selection.k_grid(every) == list(range(every + 1))
    assert len(selection.k_grid(every + 1)) == spread and len(selection.k_grid(10_000)) == spread
    assert f"the best of {spread} noisy accuracy estimates" in text
