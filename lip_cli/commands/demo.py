"""`lip demo`: its options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lip_cli.exits import user_errors
from lip_cli.options import OUTPUT, JsonOption

EXAMPLES = [
    "lip demo demo",
    "lip demo pair --noise 0,0.4",
]
EXIT_CODES = "0 done, 1 bad input, 2 usage, 130/143 signal"
DETAILS = {
    "--noise": "Several, comma-separated (e.g. 0,0.2,0.4): one model per rate in FOLDER/noise-RATE/, "
    "trained alike on the same inputs.",
}


def parse_noise(value: str | None) -> str | None:
    """--noise: comma-separated label-noise rates in [0, 1), no repeats."""
    if value is None:
        return None
    try:
        rates = [float(part) for part in value.split(",")]
    except ValueError:
        rates = []
    if rates and all(0.0 <= rate < 1.0 for rate in rates) and len(set(rates)) == len(rates):
        return value
    raise typer.BadParameter(f"{value!r} is not a list of distinct rates in [0, 1) (e.g. 0,0.2,0.4)")


def demo(
    folder: Annotated[Path, typer.Argument(help="Folder to create the demo files in.")] = Path("demo"),
    noise: Annotated[
        str | None,
        typer.Option(
            "--noise",
            parser=parse_noise,
            metavar="RATES",
            help="Share of labels made random (0.4); several (0,0.4): FOLDER/noise-RATE/.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace demo files already there.", rich_help_panel=OUTPUT)
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Make a small noisy-label problem and train a classifier on it (CPU, seconds); print what to
    run next (lip features, then lip repair)."""
    with user_errors(json_output):
        from lip_cli import demo as demo_module
        from lip_cli.render import console
        from lip_cli.render import demo as view

        rates = None if noise is None else [float(part) for part in noise.split(",")]
        if rates is not None and len(rates) > 1:
            results = demo_module.make_demo_series(folder, rates, force=force)
            if json_output:
                console.print_json({"demos": [result.document() for result in results]})
            else:
                view.render_demo_series(results)
            return
        settings = (
            demo_module.DemoSettings() if rates is None else demo_module.DemoSettings(noise_rate=rates[0])
        )
        result = demo_module.make_demo(folder, force=force, settings=settings)
        if json_output:
            console.print_json(result.document())
        else:
            view.render_demo(result)
