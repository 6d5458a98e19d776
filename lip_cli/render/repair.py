"""`lip repair` shown: the summary, the spectrum before and after, the decision and its test, the
JSON document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from lip_cli.render.common import percent, render_k_curve, spectrum_rows, targets_text
from lip_cli.render.console import bar, stdout, warning

if TYPE_CHECKING:
    from lip_cli.jobs.repair import RepairReport


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


def _change(before: float, after: float) -> str:
    delta = 100 * (after - before)
    style = "green" if delta > 0 else "red" if delta < 0 else "dim"
    return f"[{style}]{delta:+.2f} pt[/]"


def render_repair(report: RepairReport) -> None:
    console = stdout()
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
    summary.add_row("LAP targets", targets_text(report.targets, report.target_scale))
    summary.add_row("energy kept by top k", percent(report.energy_kept))
    summary.add_row(
        "effective rank", f"{report.effective_rank_before:.2f} -> {report.effective_rank_after:.2f}"
    )
    console.print(summary)
    console.print()
    console.print(_spectrum_table(report.singular_values_before, report.singular_values_after, report.k))
    accuracy = Table(title="accuracy of the layer's predictions", title_justify="left")
    for column in ("data", "before", "after", "change"):
        accuracy.add_column(column, justify="left" if column == "data" else "right")
    decision = report.decision
    val_label = "validation"
    if decision is not None and decision.data == "val":
        val_label = (
            f"validation ({decision.test.rows:,} rows)"
            if decision.given
            else f"validation ({decision.test.rows:,} confirmation rows)"
        )
    for name, label in (("train", "training (given labels)"), ("val", val_label)):
        if f"{name}_before" in report.accuracy:
            before, after = report.accuracy[f"{name}_before"], report.accuracy[f"{name}_after"]
            accuracy.add_row(label, percent(before), percent(after), _change(before, after))
    console.print(accuracy)
    if report.accuracy_rows < report.samples:
        console.print(
            f"[dim]training accuracies measured on a seeded random sample of {report.accuracy_rows:,} "
            f"of {report.samples:,} rows (--sample-rows)[/]"
        )
    holdout = report.k_selection == "holdout"
    if report.k_selection and decision is not None:
        render_k_curve(
            report.k_curve,
            report.samples,
            report.labels_origin,
            chosen=decision.best_k,
            targets=report.targets,
        )
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
        or (decision.given and decision.lower)  # the LOWERS warning says it
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
        f"{100 * test.change:+.2f} pt ({100 * decision.interval_level:.4g}% CI {100 * low:+.2f} to "
        f"{100 * high:+.2f}: each end a one-sided {100 * (1 - decision.level):.4g}% bound, as the test)",
    )
    table.add_row(
        "p-value",
        (
            f"{decision.p_value_drop:.3g} that it is worse (checked for harm only)"
            if decision.given
            else f"{decision.p_value:.3g} that it is better"
        )
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
    text = "the test alone: " + (
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
        "ci_accuracy_change": [low, high],
        "ci_level": decision.interval_level,
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
    changed = report.predictions_changed
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
        "checked": report.checked,
        "train_predictions_changed": None if changed is None or not changed[1] else changed[0] / changed[1],
        "train_prediction_rows": None if changed is None else changed[1],
        "forced": report.forced,
        "exit_code": report.exit_code,
        "output": None if report.output is None else str(report.output),
        "warnings": report.warnings,
    }
