"""`lip demo` shown: what the demo made, and the commands that come next."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from lip_cli.render.common import percent
from lip_cli.render.console import command, stdout


def render_demo(result: Any) -> None:
    console = stdout()
    settings = result.settings
    console.print(
        f"made a {settings.classes}-class problem with {settings.noise_rate:.0%} symmetric label noise, "
        f"trained a small MLP on it ({settings.train_samples:,} samples, classifier layer `fc`, "
        f"{settings.width} features)"
    )
    console.print(
        f"accuracy on its noisy training labels {percent(result.train_accuracy_noisy)}, "
        f"on clean validation labels {percent(result.val_accuracy)}"
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
    console = stdout()
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
            percent(result.train_accuracy_noisy),
            percent(result.val_accuracy),
        )
    console.print(table)
    models = " ".join(str(result.folder / "model.pt") for result in results)
    console.print("next:")
    command(f"  lip inspect {models} --layer fc --plot spectra.png")
    command(f"  lip compare {models} --plot phi.png")
