"""The terminal: rich tables, bars and progress on stderr, and JSON documents for stdout.

The only module that imports rich. Human output goes to stderr so that stdout carries nothing but
the `--json` document.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from lip_cli.jobs import Progress, RepairReport

_BLOCKS = " ▏▎▍▌▋▊▉█"
_SPARKS = "▁▂▃▄▅▆▇█"
_stderr: Console | None = None


class _Lines(Console):
    """A console whose lines carry no trailing spaces (a table's title is padded to its width) when
    it is not a terminal."""

    def _render_buffer(self, buffer: Any) -> str:
        text = super()._render_buffer(buffer)
        return text if self.is_terminal else _TRAILING_SPACES.sub("\n", text)


_TRAILING_SPACES = re.compile(r"[ \t]+\n")


def stderr() -> Console:
    """The console for everything meant for people."""
    global _stderr
    if _stderr is None or _stderr.file is not sys.stderr:
        _stderr = _Lines(stderr=True, highlight=False)
    return _stderr


def command(text: str) -> None:
    """A command for the user to copy: one line whatever the width, never wrapped."""
    stderr().print(Text(text), soft_wrap=True)


def error(message: str) -> None:
    """One line on stderr; under torchrun only rank 0 says it (every rank fails with the same one)."""
    from lip_cli.distributed import is_leader

    if is_leader():
        stderr().print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def warning(message: str) -> None:
    """Wrapped at word boundaries on a terminal, one line otherwise (for logs and grep)."""
    console = stderr()
    console.print(Text("warning: ", style="bold yellow") + Text(message), soft_wrap=not console.is_terminal)


printed: list[bool] = []  # whether this run has printed its JSON document


def print_json(document: dict[str, Any]) -> None:
    """One JSON document alone on stdout, with the version of lip that wrote it; a value that is not
    a finite number is null (JSON has no NaN or Infinity)."""
    from lip_cli import __version__

    printed.append(True)
    document = {"lip_version": __version__, **document}
    sys.stdout.write(json.dumps(_finite_only(document), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite_only(value: Any) -> Any:
    """`value` with every NaN or infinite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_only(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(item) for item in value]
    return value


def error_document(message: str, exit_code: int) -> dict[str, Any]:
    return {"error": {"message": message, "exit_code": exit_code}}


def fail(message: str, exit_code: int, as_json: bool) -> None:
    """A failure's one line on stderr and, under --json, its error document on stdout unless this
    run has printed its document already (stdout carries exactly one)."""
    from lip_cli.distributed import is_leader

    error(message)
    if as_json and not printed and is_leader():
        print_json(error_document(message, exit_code))


def bar(value: float, maximum: float, width: int = 24) -> str:
    """A horizontal bar of `width` cells for value / maximum, in eighths of a cell."""
    if maximum <= 0 or value <= 0:
        return ""
    eighths = round(min(value / maximum, 1.0) * width * 8)
    return _BLOCKS[-1] * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")


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


@contextlib.contextmanager
def progress_bar(enabled: bool = True, delay: float = 0.5) -> Iterator[Progress]:
    """A progress callback that shows a bar only on a terminal and once a pass takes a moment."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = stderr()
    started = time.monotonic()
    live: dict[str, Any] = {}

    def update(task: str, done: int, total: int) -> None:
        if not enabled or not console.is_terminal or time.monotonic() - started < delay:
            return
        if "bar" not in live:
            live["bar"] = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            live["bar"].start()
        tasks = live.setdefault("tasks", {})
        if task not in tasks:
            tasks[task] = live["bar"].add_task(task, total=total)
        live["bar"].update(tasks[task], completed=done)

    try:
        yield update
    finally:
        if "bar" in live:
            live["bar"].stop()


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


def _spectrum_table(before: Sequence[float], after: Sequence[float], k: int) -> Table:
    table = Table(
        title="singular values of W",
        title_justify="left",
        caption=f"1..{k} kept (PSP), the rest re-fitted (LAP)",
    )
    table.add_column("i", justify="right")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("", no_wrap=True)
    top = max([*before, *map(abs, after), 0.0])
    for index in spectrum_rows(len(before), k):
        if index is None:
            table.add_row("…", "", "", "")
            continue
        if index == k and k > 0:
            table.add_section()
        part = "[cyan]" if index < k else "[magenta]"
        table.add_row(
            str(index + 1),
            f"{before[index]:.4g}",
            f"{after[index]:.4g}",
            f"{part}{bar(abs(after[index]), top)}[/]",
        )
    return table


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _change(before: float, after: float) -> str:
    delta = 100 * (after - before)
    style = "green" if delta > 0 else "red" if delta < 0 else "dim"
    return f"[{style}]{delta:+.2f} pt[/]"


def render_repair(report: RepairReport) -> None:
    console = stderr()
    layer = report.layer
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("checkpoint", str(report.checkpoint))
    summary.add_row(
        "layer",
        f"{layer.name}  ({layer.out_features} classes x {layer.in_features} inputs, "
        f"{str(layer.dtype).removeprefix('torch.')}, {'with' if report.has_bias else 'no'} bias)",
    )
    summary.add_row("samples", f"{report.samples:,}  (labels from {report.labels_origin})")
    if report.val_labels_origin:
        summary.add_row("validation labels", report.val_labels_origin)
    summary.add_row("k / rank", f"{report.k} / {report.rank}")
    if report.targets != "paper":
        summary.add_row("LAP targets", f"{report.targets} (labels scaled by c = {report.target_scale:.4g})")
    summary.add_row("energy kept by top k", _percent(report.energy_kept))
    summary.add_row(
        "effective rank", f"{report.effective_rank_before:.2f} -> {report.effective_rank_after:.2f}"
    )
    console.print(summary)
    console.print()
    console.print(_spectrum_table(report.singular_values_before, report.singular_values_after, report.k))
    accuracy = Table(title="accuracy of the layer's predictions", title_justify="left")
    for column in ("data", "before", "after", "change"):
        accuracy.add_column(column, justify="left" if column == "data" else "right")
    for name, label in (("train", "training (given labels)"), ("val", "validation")):
        if f"{name}_before" in report.accuracy:
            before, after = report.accuracy[f"{name}_before"], report.accuracy[f"{name}_after"]
            accuracy.add_row(label, _percent(before), _percent(after), _change(before, after))
    console.print(accuracy)
    if report.accuracy_rows < report.samples:
        console.print(
            f"[dim]training accuracies measured on a seeded random sample of {report.accuracy_rows:,} "
            f"of {report.samples:,} rows (--sample-rows)[/]"
        )
    decision = report.decision
    holdout = report.k_selection == "holdout"
    if report.k_selection and decision is not None:
        render_k_curve(report.k_curve, report.samples, report.labels_origin, chosen=decision.best_k)
        console.print(
            f"--k auto: k chosen on {decision.selection_rows:,} held-out training rows (noisy labels); "
            "nothing tested them: no validation set"
            if holdout
            else f"--k auto: k chosen on {decision.selection_rows:,} rows of the validation set, then "
            f"tested on {decision.test.rows:,} other rows (seeded split, --seed)"
        )
    if decision is not None and decision.best_k != decision.rank and not holdout:
        console.print(_decision_table(decision))
    elif decision is not None and decision.power is not None and not holdout:
        console.print(f"[bold]power[/]  {_power_text(decision.power)}")
    warned = decision is not None and (
        any(decision.reason in message for message in report.warnings)
        or (decision.given and decision.test.change < 0)  # the LOWERS warning says it
    )
    if not warned:
        console.print(f"[bold]decision[/]: {report.decision_text}")
    for message in report.warnings:
        warning(message)
    if report.other_copies:
        console.print(
            f"[dim]left as they are: other copies of this layer ({', '.join(report.other_copies)}); "
            "pass --layer to repair one of them[/]"
        )
    if report.output is None:
        console.print("nothing written")
    else:
        console.print(f"wrote [bold]{report.output}[/]")


def _decision_table(decision: Any) -> Table:
    """The paired test of a k against the unrepaired layer: the rows, the discordant counts, p, CI."""
    test = decision.test
    low, high = decision.interval
    title = "validation rows" if decision.given else "confirmation rows"
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "test",
        f"k = {decision.best_k} against the unrepaired layer on {test.rows:,} {title}"
        + ("" if decision.given else f" ({decision.selection_rows:,} other rows chose k)"),
    )
    table.add_row(
        "discordant rows",
        f"{test.gains:,} right only after the repair, {test.losses:,} right only before",
    )
    table.add_row(
        "accuracy change",
        f"{100 * test.change:+.2f} pt (95% CI {100 * low:+.2f} to {100 * high:+.2f}, Newcombe)",
    )
    table.add_row(
        "p-value",
        f"{decision.p_value:.3g} that it is better"
        + (f", {decision.p_value_drop:.3g} that it is worse" if decision.given else "")
        + f" (exact one-sided McNemar; alpha {decision.alpha:g})",
    )
    if decision.power is not None:
        table.add_row("power", _power_text(decision.power))
    return table


def _power_text(power: Any) -> str:
    """What a test could detect, in one sentence: the gain it confirms 80% of the time, the rows a
    1-point gain needs."""
    rows, level = f"{power.rows:,} rows", f"{power.level:.0%}"
    gain = power.smallest_detectable_gain
    text = (
        f"{rows} detect a gain of {100 * gain:.1f} points or more {level} of the time"
        if gain is not None
        else f"on {rows} no gain is detected {level} of the time, even one on every discordant row"
    )
    text += (
        f" at alpha {power.alpha:g} (discordance {100 * power.discordance:.1f}%: {power.discordance_from})"
    )
    needed = power.validation_rows_for_one_point
    return text + (f"; a 1-point gain needs about {needed:,} validation rows" if needed else "")


def power_document(power: Any) -> dict[str, Any]:
    """The power keys of a decision's JSON (all None when no discordance was measured)."""
    return {
        "power_level": None if power is None else power.level,
        "power_rows": None if power is None else power.rows,
        "discordance": None if power is None else power.discordance,
        "discordance_from": None if power is None else power.discordance_from,
        "smallest_detectable_gain": None if power is None else power.smallest_detectable_gain,
        "validation_rows_for_1pt_gain": None if power is None else power.validation_rows_for_one_point,
    }


def decision_document(decision: Any) -> dict[str, Any] | None:
    if decision is None:
        return None
    low, high = decision.interval
    test = decision.test
    return {
        "data": decision.data,
        "given_k": decision.given,
        "best_k": decision.best_k,
        "selection_rows": decision.selection_rows,
        "confirmation_rows": test.rows,
        "selection_change": decision.selection_change,
        "discordant_gains": test.gains,
        "discordant_losses": test.losses,
        "both_right": test.both,
        "both_wrong": test.neither,
        "accuracy_change": test.change,
        "ci95_accuracy_change": [low, high],
        "p_value": decision.p_value,
        "p_value_drop": decision.p_value_drop,
        "alpha": decision.alpha,
        "targets": decision.targets,
        "targets_chosen": decision.targets_chosen,
        "confirmed": None if decision.given else decision.confirmed,
        "outcome": decision.outcome,
        **power_document(decision.power),
    }


def repair_document(report: RepairReport) -> dict[str, Any]:
    from lip_cli import __version__

    layer = report.layer
    return {
        "lip_version": __version__,
        "checkpoint": str(report.checkpoint),
        "layer": layer.name,
        "weight_key": layer.weight_key,
        "bias_key": layer.bias_key,
        "weight_shape": [layer.out_features, layer.in_features],
        "dtype": str(layer.dtype).removeprefix("torch."),
        "samples": report.samples,
        "accuracy_rows": report.accuracy_rows,
        "labels_source": report.labels_origin,
        "val_labels_source": report.val_labels_origin,
        "k": report.k,
        "rank": report.rank,
        "energy_kept": report.energy_kept,
        "effective_rank_before": report.effective_rank_before,
        "effective_rank_after": report.effective_rank_after,
        "singular_values_before": report.singular_values_before,
        "singular_values_after": report.singular_values_after,
        "unexcited_directions": report.unexcited,
        "other_copies": report.other_copies,
        "accuracy": report.accuracy,
        "k_chosen": report.k,
        "targets": report.targets,
        "target_scale": report.target_scale,
        "k_selection": report.k_selection,
        "k_curve": report.k_curve,
        "test": decision_document(report.decision),
        "decision": report.decision_text,
        "outcome": report.outcome,
        "forced": report.forced,
        "exit_code": report.exit_code,
        "output": None if report.output is None else str(report.output),
        "warnings": report.warnings,
    }


def render_demo(result: Any) -> None:
    console = stderr()
    settings = result.settings
    console.print(
        f"made a {settings.classes}-class problem with {settings.noise_rate:.0%} symmetric label noise, "
        f"trained a small MLP on it ({settings.train_samples:,} samples, classifier layer `fc`, "
        f"{settings.width} features)"
    )
    console.print(
        f"accuracy on its noisy training labels {_percent(result.train_accuracy_noisy)}, "
        f"on clean validation labels {_percent(result.val_accuracy)}"
    )
    from lip_cli.demo import DEMO_FILES

    for name in DEMO_FILES:
        console.print(f"  {result.folder / name}")
    model, folder = result.folder / "model.pt", result.folder
    console.print("next:")
    for part in ("train", "val"):
        command(
            f"  lip features {model} --model python:lip_cli.demo:demo_model "
            f"--data {folder / part / 'inputs.npy'} --labels {folder / part / 'targets.npy'} "
            f"--out {folder / part / 'features.npy'}"
        )
    command(
        f"  lip repair {model} --features {folder / 'train' / 'features.npy'} "
        f"--val-features {folder / 'val' / 'features.npy'} --k auto"
    )


def render_demo_series(results: Sequence[Any]) -> None:
    """`lip demo --noise 0,0.2,...`: a line per model, and the analysis to run on them."""
    console = stderr()
    settings = results[0].settings
    console.print(
        f"made a {settings.classes}-class problem and trained a small MLP on it ({settings.train_samples:,} "
        f"samples, classifier layer `fc`, {settings.width} features) at {len(results)} label-noise rates:"
    )
    table = Table()
    for column in ("noise", "folder", "accuracy on its noisy labels", "on clean val labels"):
        table.add_column(column, justify="left" if column == "folder" else "right")
    for result in results:
        table.add_row(
            f"{result.settings.noise_rate:.0%}",
            str(result.folder),
            _percent(result.train_accuracy_noisy),
            _percent(result.val_accuracy),
        )
    console.print(table)
    models = " ".join(str(result.folder / "model.pt") for result in results)
    console.print("next:")
    command(f"  lip inspect {models} --layer fc --plot spectra.png")
    command(f"  lip compare {models} --plot phi.png")


def render_provenance(record: dict | None) -> None:
    if not record:
        return
    stderr().print(
        f"[bold]written by lip {record.get('lip_version', '?')}[/] on {record.get('created', '?')}: "
        f"{record.get('method', 'PSP + LAP')} on `{record.get('layer')}`, k = {record.get('k')} "
        f"({record.get('k_selection')}), targets {record.get('targets')}, from {record.get('input')} "
        f"(sha256 {str(record.get('input_sha256'))[:12]}…) and {record.get('features')} "
        f"(sha256 {str(record.get('features_sha256'))[:12]}…)",
        soft_wrap=True,
    )


_STATISTICS = ("shape", "rank", "‖W‖₂", "stable\nrank", "eff.\nrank", "top-10%\nenergy")


def _statistics_table(title: str, leading: Sequence[str], trailing: Sequence[str] = ()) -> Table:
    """A table of spectral statistics that fits 80 columns: the leading (name) column folds, numbers
    never wrap."""
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(leading):
        table.add_column(column, overflow="fold", no_wrap=index > 0)
    for column in (*_STATISTICS, *trailing):
        table.add_column(column, justify="right", no_wrap=True)
    return table


def _statistics_cells(spectrum: Any) -> list[str]:
    return [
        spectrum.shape_text,
        str(spectrum.rank),
        f"{spectrum.spectral_norm:.4g}",
        f"{spectrum.stable_rank:.2f}",
        f"{spectrum.effective_rank:.2f}",
        _percent(spectrum.top_energy),
    ]


def render_inspect(report: Any) -> None:
    render_provenance(report.provenance)
    table = _statistics_table(f"2-D weights of {report.checkpoint}", ("layer", "dtype"))
    for layer in report.layers:
        name = escape(layer.name) + (" [bold green]◀[/]" if layer.is_classifier else "")
        table.add_row(name, layer.dtype, *_statistics_cells(layer))
    console = stderr()
    console.print(table)
    console.print(
        f"[dim]◀ the likely classifier; not shown: {report.other_tensors} other tensors (biases, norms, "
        "convolutions, buffers)[/]"
    )


def render_series(series: Any) -> None:
    """`lip inspect A B C ...`: a row per checkpoint for one layer."""
    dtypes = ", ".join(sorted({layer.spectrum.dtype for layer in series.layers}))
    table = _statistics_table(
        f"`{series.layer}` ({dtypes}) in {len(series.layers)} checkpoints",
        ("checkpoint",),
        ("k for\n90/95/99%",),
    )
    for label, layer in zip(series.labels, series.layers, strict=True):
        spectrum = layer.spectrum
        table.add_row(
            escape(label),
            *_statistics_cells(spectrum),
            "/".join(str(k) for k in spectrum.k_for_energy.values()),
        )
    console = stderr()
    for label, layer in zip(series.labels, series.layers, strict=True):
        if layer.provenance:
            console.print(f"[bold]{escape(label)}[/]:", end=" ")
            render_provenance(layer.provenance)
    console.print(table)


def layer_summary_rows(spectrum: Any) -> Table:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("layer", f"{spectrum.name}  ({spectrum.shape[0]}x{spectrum.shape[1]}, {spectrum.dtype})")
    summary.add_row("rank", f"{spectrum.rank} of {len(spectrum.singular_values)}")
    summary.add_row("spectral norm", f"{spectrum.spectral_norm:.4g}")
    summary.add_row("stable rank", f"{spectrum.stable_rank:.2f}")
    summary.add_row("effective rank", f"{spectrum.effective_rank:.2f}")
    summary.add_row(
        "k for energy", "   ".join(f"{level:.0%}: {k}" for level, k in spectrum.k_for_energy.items())
    )
    summary.add_row("spectrum", sparkline(spectrum.singular_values))
    return summary


def render_layer(report: Any, top: int) -> None:
    console = stderr()
    spectrum = report.spectrum
    console.print(f"[bold]{report.checkpoint}[/]")
    render_provenance(report.provenance)
    console.print(layer_summary_rows(spectrum))
    values = spectrum.singular_values
    energy = spectrum.cumulative_energy
    table = Table(title=f"top {min(top, len(values))} of {len(values)} singular values", title_justify="left")
    for column in ("i", "sigma", "cumulative energy", ""):
        table.add_column(column, justify="right" if column else "left", no_wrap=True)
    for index in range(min(top, len(values))):
        table.add_row(
            str(index + 1), f"{values[index]:.4g}", _percent(energy[index]), bar(values[index], values[0])
        )
    console.print(table)
    if report.k_curve:
        render_k_curve(report.k_curve, report.samples, report.labels_origin)


def render_k_curve(
    curve: list[dict[str, float]], samples: int | None, origin: str | None, chosen: int | None = None
) -> None:
    """Accuracy after PSP + LAP against k: sparklines, and a table of about a dozen k values."""
    console = stderr()
    columns = ["train_accuracy"] + (["val_accuracy"] if "val_accuracy" in curve[0] else [])
    console.print(f"accuracy after PSP + LAP at each k ({samples:,} training samples, labels from {origin})")
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
        table.add_row(label, *(_percent(point[column]) for column in columns), bar(point[columns[-1]], 1.0))
    console.print(table)


def render_compare(report: Any) -> None:
    console = stderr()
    a, b = report.spectrum_a, report.spectrum_b
    console.print(
        f"[bold]{report.layer}[/] ({a.shape[0]}x{a.shape[1]}):  "
        f"A = {report.checkpoint_a}   B = {report.checkpoint_b}"
    )
    summary = Table(show_header=True)
    for column in ("", "A", "B"):
        summary.add_column(column, justify="left" if not column else "right")
    summary.add_row("rank", str(a.rank), str(b.rank))
    summary.add_row("spectral norm", f"{a.spectral_norm:.4g}", f"{b.spectral_norm:.4g}")
    summary.add_row("stable rank", f"{a.stable_rank:.2f}", f"{b.stable_rank:.2f}")
    summary.add_row("effective rank", f"{a.effective_rank:.2f}", f"{b.effective_rank:.2f}")
    summary.add_row("spectrum", sparkline(a.singular_values, 30), sparkline(b.singular_values, 30))
    console.print(summary)
    values = Table(title="singular values", title_justify="left")
    for column in ("i", "A", "B", "B / A"):
        values.add_column(column, justify="right")
    ratio = report.ratio
    for index in spectrum_rows(len(a.singular_values), 0, head=8, around=0, tail=4):
        if index is None:
            values.add_row("…", "", "", "")
            continue
        values.add_row(
            str(index + 1),
            f"{a.singular_values[index]:.4g}",
            f"{b.singular_values[index]:.4g}",
            "-" if ratio[index] is None else f"{ratio[index]:.3f}",
        )
    console.print(values)
    console.print("[bold]subspace similarity phi(i, j)[/] of the top right singular vectors (1 = same span)")
    phi = Table()
    phi.add_column("i \\ j", justify="right")
    for size in report.sizes:
        phi.add_column(str(size), justify="right")
    for size, row in zip(report.sizes, report.phi, strict=True):
        phi.add_row(str(size), *(f"{value:.3f}" for value in row))
    console.print(phi)
    console.print("[bold]largest principal angle[/] between the top-k right singular subspaces")
    angles = Table()
    angles.add_column("k", justify="right")
    angles.add_column("degrees", justify="right")
    for k, degrees in report.largest_angle_degrees.items():
        angles.add_row(str(k), f"{degrees:.2f}")
    console.print(angles)


def render_compare_series(reports: Sequence[Any], labels: Sequence[str]) -> None:
    """`lip compare REF B C ...`: each checkpoint against the reference, one column per comparison."""
    console = stderr()
    labels = [escape(label) for label in labels]
    reference, names = labels[0], labels[1:]
    first = reports[0]
    console.print(
        f"[bold]{escape(first.layer)}[/] ({first.spectrum_a.shape_text}) against the reference "
        f"[bold]{reference}[/] = {escape(str(first.checkpoint_a))}"
    )
    for name, report in zip(names, reports, strict=True):
        console.print(f"  {name} = {escape(str(report.checkpoint_b))}", soft_wrap=True)
    summary = _statistics_table("spectra", ("checkpoint",))
    spectra = [first.spectrum_a, *(report.spectrum_b for report in reports)]
    for name, spectrum in zip(labels, spectra, strict=True):
        summary.add_row(name, *_statistics_cells(spectrum))
    console.print(summary)

    console.print(f"[bold]singular values[/] of {reference}, then each checkpoint's over them (B / A)")
    ratios = Table()
    ratios.add_column("i", justify="right")
    ratios.add_column(reference, justify="right", overflow="fold")
    for name in names:
        ratios.add_column(name, justify="right", overflow="fold")
    values = first.spectrum_a.singular_values
    for index in spectrum_rows(len(values), 0, head=8, around=0, tail=4):
        if index is None:
            ratios.add_row("…", *([""] * (len(reports) + 1)))
            continue
        cells = [report.ratio[index] for report in reports]
        ratios.add_row(
            str(index + 1),
            f"{values[index]:.4g}",
            *("-" if cell is None else f"{cell:.3f}" for cell in cells),
        )
    console.print(ratios)

    sizes = first.sizes
    console.print(
        "[bold]subspace similarity phi(k, k)[/] of the top-k right singular vectors with the "
        "reference's (1 = same span)"
    )
    phi = [[f"{report.phi[index][index]:.3f}" for index in range(len(sizes))] for report in reports]
    console.print(_by_size_table(names, sizes, phi))
    console.print("[bold]largest principal angle[/] (degrees) between the top-k right singular subspaces")
    angles = [[f"{report.largest_angle_degrees[k]:.2f}" for k in sizes] for report in reports]
    console.print(_by_size_table(names, sizes, angles))


def _by_size_table(names: Sequence[str], sizes: Sequence[int], columns: list[list[str]]) -> Table:
    """A row per subspace size k, a column per comparison."""
    table = Table()
    table.add_column("k", justify="right")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for index, k in enumerate(sizes):
        table.add_row(str(k), *(column[index] for column in columns))
    return table


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


def inspect_document(report: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(report.checkpoint),
        "layers": [spectrum_document(layer, full=False) for layer in report.layers],
        "other_tensors": report.other_tensors,
        "provenance": report.provenance,
    }


def layer_document(report: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(report.checkpoint),
        "layer": spectrum_document(report.spectrum, full=True),
        "samples": report.samples,
        "labels_source": report.labels_origin,
        "k_curve": report.k_curve,
        "provenance": report.provenance,
    }


def compare_document(report: Any) -> dict[str, Any]:
    return {
        "checkpoint_a": str(report.checkpoint_a),
        "checkpoint_b": str(report.checkpoint_b),
        "layer": report.layer,
        "a": spectrum_document(report.spectrum_a, full=True),
        "b": spectrum_document(report.spectrum_b, full=True),
        "ratio": report.ratio,
        "phi": {
            "sizes": report.sizes,
            "values": report.phi,
        },
        "largest_principal_angle_degrees": {str(k): v for k, v in report.largest_angle_degrees.items()},
    }


def series_document(series: Any) -> dict[str, Any]:
    """One entry per checkpoint, in order: its label and the fields of `lip inspect X --layer L`."""
    return {
        "layer": series.layer,
        "checkpoints": [
            {"label": label} | layer_document(report)
            for label, report in zip(series.labels, series.layers, strict=True)
        ],
    }


def compare_series_document(reports: Sequence[Any], labels: Sequence[str]) -> dict[str, Any]:
    """One entry per comparison, in order, each the document of `lip compare REF X`."""
    return {
        "reference": str(reports[0].checkpoint_a),
        "labels": list(labels),
        "layer": reports[0].layer,
        "comparisons": [compare_document(report) for report in reports],
    }


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
    console = stderr()
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
