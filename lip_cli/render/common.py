"""Pieces that several commands show: sparklines, spectrum rows, the statistics table of a spectrum,
the accuracy curve over k, a checkpoint's provenance, a spectrum as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from lip_cli.render.console import bar, stdout

_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """Values as one line of block heights (averaged into `width` cells when longer)."""
    if not values:
        return ""
    cells = min(width, len(values))
    buckets = [
        values[i * len(values) // cells : max((i + 1) * len(values) // cells, i * len(values) // cells + 1)]
        for i in range(cells)
    ]
    means = [sum(bucket) / len(bucket) for bucket in buckets]
    top = max(means)
    if top <= 0:
        return _SPARKS[0] * cells
    return "".join(
        _SPARKS[min(len(_SPARKS) - 1, int(mean / top * (len(_SPARKS) - 1) + 0.5))] for mean in means
    )


def spectrum_rows(count: int, k: int, head: int = 5, around: int = 2, tail: int = 3) -> list[int | None]:
    """Indices to show of a long spectrum: the head, both sides of k, the tail; None marks a gap."""
    wanted = set(range(min(head, count)))
    wanted |= set(range(max(0, k - around), min(count, k + around)))
    wanted |= set(range(max(0, count - tail), count))
    rows: list[int | None] = []
    previous = -1
    for index in sorted(wanted):
        if index != previous + 1:
            rows.append(None)
        rows.append(index)
        previous = index
    return rows


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


_STATISTICS = ("shape", "rank", "‖W‖₂", "stable\nrank", "eff.\nrank", "top-10%\nenergy")


def statistics_table(title: str, leading: Sequence[str], trailing: Sequence[str] = ()) -> Table:
    """A table of spectral statistics that fits 80 columns: the leading (name) column folds, numbers
    never wrap."""
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(leading):
        table.add_column(column, overflow="fold", no_wrap=index > 0)
    for column in (*_STATISTICS, *trailing):
        table.add_column(column, justify="right", no_wrap=True)
    return table


def statistics_cells(spectrum: Any) -> list[str]:
    return [
        spectrum.shape_text,
        str(spectrum.rank),
        f"{spectrum.spectral_norm:.4g}",
        f"{spectrum.stable_rank:.2f}",
        f"{spectrum.effective_rank:.2f}",
        percent(spectrum.top_energy),
    ]


def targets_text(targets: str, target_scale: float | None = None) -> str:
    """The fitting rule in words, for every summary that shows a fit."""
    if targets == "paper":
        return "paper (the labels themselves, the paper's formula)"
    scale = f", c = {target_scale:.4g}" if target_scale is not None else ""
    return f"{targets} (labels centred and scaled to the head's logit margin{scale})"


def render_k_curve(
    curve: list[dict[str, float]],
    samples: int | None,
    origin: str | None,
    chosen: int | None = None,
    targets: str | None = None,
) -> None:
    """Accuracy after PSP + LAP against k: sparklines, and a table of about a dozen k values."""
    console = stdout()
    columns = ["train_accuracy"] + (["val_accuracy"] if "val_accuracy" in curve[0] else [])
    rule = f"{targets} targets, " if targets else ""
    console.print(
        f"accuracy after PSP + LAP at each k ({rule}{samples:,} training samples, labels from {origin})"
    )
    for column in columns:
        name = "training" if column == "train_accuracy" else "validation"
        values = [point[column] for point in curve]
        console.print(f"  {name:<10} k = {curve[0]['k']} … {curve[-1]['k']}   {sparkline(values)}")
    table = Table(show_header=True)
    table.add_column("k", justify="right")
    for column in columns:
        table.add_column("training" if column == "train_accuracy" else "validation", justify="right")
    table.add_column("", no_wrap=True)
    step = max(1, len(curve) // 12)
    indices = {*range(0, len(curve), step), len(curve) - 1}
    indices |= {index for index, point in enumerate(curve) if point["k"] == chosen}
    for index in sorted(indices):
        point = curve[index]
        label = f"[bold green]{point['k']} ◀[/]" if point["k"] == chosen else str(point["k"])
        table.add_row(label, *(percent(point[column]) for column in columns), bar(point[columns[-1]], 1.0))
    console.print(table)


def render_provenance(record: dict | None) -> None:
    if not record:
        return
    stdout().print(
        f"[bold]written by lip {record.get('lip_version', '?')}[/] on {record.get('created', '?')}: "
        f"{record.get('method', 'PSP + LAP')} on `{record.get('layer')}`, k = {record.get('k')} "
        f"({record.get('k_selection')}), targets {record.get('targets')}, from {record.get('input')} "
        f"(sha256 {str(record.get('input_sha256'))[:12]}…) and {record.get('features')} "
        f"(sha256 {str(record.get('features_sha256'))[:12]}…)",
        soft_wrap=True,
    )
    if "outcome" in record:
        stdout().print(f"[bold]judged[/]: {_evidence_text(record)}", soft_wrap=True)


def _evidence_text(record: dict) -> str:
    """What judged k, from a provenance record: the outcome, the validation files, split and test."""
    parts = [f"outcome {record.get('outcome')}"]
    if record.get("checked") is False:
        parts.append("not checked by any validation rows")
    if record.get("val_features"):
        parts.append(
            f"validation {record['val_features']} (sha256 {str(record.get('val_features_sha256'))[:12]}…), "
            f"labels {record.get('val_labels')}"
            + (
                f" (sha256 {str(record['val_labels_sha256'])[:12]}…)"
                if record.get("val_labels_sha256")
                else ""
            )
        )
    if record.get("confirmation_rows") is not None:
        parts.append(
            f"{record.get('selection_rows', 0):,} selection / {record['confirmation_rows']:,} test rows, "
            f"{record.get('discordant_gains')} gains / {record.get('discordant_losses')} losses, "
            f"p = {record.get('p_value', float('nan')):.2g} (better), "
            f"{record.get('p_value_drop', float('nan')):.2g} (worse)"
        )
    parts.append(f"seed {record.get('seed')}, alpha {record.get('alpha')}")
    if record.get("forced"):
        parts.append("written by --force-write")
    return "; ".join(parts)


def spectrum_document(spectrum: Any, full: bool) -> dict[str, Any]:
    document = {
        "name": spectrum.name,
        "shape": list(spectrum.shape),
        "dtype": spectrum.dtype,
        "rank": spectrum.rank,
        "spectral_norm": spectrum.spectral_norm,
        "stable_rank": spectrum.stable_rank,
        "effective_rank": spectrum.effective_rank,
        "top10_energy": spectrum.top_energy,
        "is_classifier": spectrum.is_classifier,
    }
    if full:
        document["singular_values"] = spectrum.singular_values
        document["cumulative_energy"] = spectrum.cumulative_energy
        document["k_for_energy"] = {str(level): k for level, k in spectrum.k_for_energy.items()}
    return document
