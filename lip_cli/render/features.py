"""`lip features` shown: what was cached, and the command that uses it."""

from __future__ import annotations

from typing import Any

from lip_cli.render.console import command, stdout


def features_document(report: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(report.checkpoint),
        "features": str(report.features),
        "labels": str(report.labels),
        "classes": None if report.classes_file is None else str(report.classes_file),
        "samples": report.samples,
        "feature_dim": report.feature_dim,
        "layer": report.layer,
        "model": report.model,
        "seconds": report.seconds,
    }


def render_features(report: Any) -> None:
    console = stdout()
    console.print(
        f"cached the {report.feature_dim} inputs of `{report.layer}` ({report.model}) for {report.samples:,} "
        f"samples in {report.seconds:.1f} s ({report.samples / max(report.seconds, 1e-9):,.0f} samples/s)"
    )
    console.print(f"wrote [bold]{report.features}[/] and {report.labels}")
    if report.classes_file is not None:
        console.print(f"class names in {report.classes_file}")
    if report.other_split is not None:  # the other split's cache is already there: the whole command
        train, val = (
            (report.other_split, report.features)
            if report.validation
            else (report.features, report.other_split)
        )
        command(f"next: lip repair {report.checkpoint} --features {train} --val-features {val} --k auto")
    elif report.validation:
        command(
            f"next: lip repair {report.checkpoint} --features TRAIN --val-features {report.features} --k auto"
        )
        console.print("      TRAIN: the cache of the training data, made the same way")
    else:
        command(
            f"next: lip repair {report.checkpoint} --features {report.features} --val-features VAL --k auto"
        )
        console.print("      VAL: a cache of clean validation data (else leave --val-features out)")
