"""`lip features`: its options."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from lip_cli.exits import user_errors
from lip_cli.options import COMPUTE, INPUTS, OUTPUT, Device, ForceOption, JsonOption, LayerOption

EXAMPLES = [
    "lip features model.pt --model timm:resnet50 --data train/ -o train.npy",
    "lip features model.pt --model python:net:make --data x.npy -l y.npy -o f.npy",
]
EXIT_CODES = "0 done, 1 bad input, 2 usage, 130/143 signal"
DETAILS = {
    "--model": "torchvision, timm and hf: (image classification) need the vision extra; python: names "
    "a module installed or in the current folder. The number of classes is read from the "
    "checkpoint's head (and passed to a factory that takes num_classes or num_labels).",
    "--out": "train.npy: train.labels.npy (and train.classes.json for an image folder). Missing "
    "folders are made.",
    "--mean": "For example 0.485,0.456,0.406.",
    "--std": "For example 0.229,0.224,0.225.",
    "--model-arg": "The value is read as an int, a float, true/false, else text.",
}


IMAGES = "Image folders"


class FeatureDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"


def parse_triple(value: str | None) -> str | None:
    """--mean/--std: three comma-separated numbers."""
    if value is None:
        return None
    parts = value.split(",")
    try:
        if len(parts) == 3:
            [float(part) for part in parts]
            return value
    except ValueError:
        pass
    raise typer.BadParameter(f"{value!r} is not three comma-separated numbers (e.g. 0.485,0.456,0.406)")


def parse_model_arg(value: str) -> str:
    """--model-arg: KEY=VALUE, the key a Python identifier."""
    key, equals, _ = value.partition("=")
    if not equals or not key.isidentifier():
        raise typer.BadParameter(f"{value!r} is not KEY=VALUE with KEY a Python name (e.g. depth=18)")
    return value


def features(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Trained weights: a torch file, safetensors, a model folder.", readable=False),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            metavar="SPEC",
            help="torchvision:NAME, timm:NAME, hf:DIR or python:module:factory.",
            rich_help_panel=INPUTS,
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="An image folder (a sub-folder per class) or a .npy of inputs.",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The cache to write (.npy); its labels go beside it.",
            rich_help_panel=OUTPUT,
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            "-l",
            help="Labels of a .npy of inputs (class ids or a matrix).",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    layer: LayerOption = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Samples per forward pass.", rich_help_panel=COMPUTE)
    ] = 64,
    device: Annotated[
        Device, typer.Option("--device", help="Where the model runs.", rich_help_panel=COMPUTE)
    ] = Device.cpu,
    num_workers: Annotated[
        int,
        typer.Option(
            "--num-workers", min=0, help="Data-loading processes (0: none).", rich_help_panel=COMPUTE
        ),
    ] = 0,
    dtype: Annotated[
        FeatureDtype,
        typer.Option("--dtype", metavar="DTYPE", help="float32 or float16 on disk.", rich_help_panel=OUTPUT),
    ] = FeatureDtype.float32,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the first N samples.", rich_help_panel=INPUTS)
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", min=1, help="Crop size (default: the model's, or 224).", rich_help_panel=IMAGES
        ),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean", parser=parse_triple, metavar="R,G,B", help="Normalisation mean.", rich_help_panel=IMAGES
        ),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option(
            "--std", parser=parse_triple, metavar="R,G,B", help="Normalisation std.", rich_help_panel=IMAGES
        ),
    ] = None,
    model_args: Annotated[
        list[str] | None,
        typer.Option(
            "--model-arg",
            parser=parse_model_arg,
            metavar="KEY=VALUE",
            help="Passed to a python: factory (repeat it).",
            rich_help_panel=INPUTS,
        ),
    ] = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Cache the inputs of a model's classifier layer over a data set: what `lip repair` needs."""
    with user_errors(json_output):
        from lip_cli.jobs import features as job
        from lip_cli.render import console
        from lip_cli.render import features as view

        def triple(value: str | None) -> tuple[float, float, float] | None:
            return None if value is None else tuple(float(part) for part in value.split(","))  # type: ignore[return-value]

        request = job.FeaturesRequest(
            checkpoint=checkpoint,
            model=model,
            data=data,
            out=out,
            labels=labels,
            layer=layer,
            batch_size=batch_size,
            device=device.value,
            num_workers=num_workers,
            dtype=dtype.value,
            limit=limit,
            image_size=image_size,
            mean=triple(mean),
            std=triple(std),
            force=force,
            model_args=tuple(tuple(pair.split("=", 1)) for pair in model_args or ()),  # type: ignore[misc]
        )
        with console.progress_bar(enabled=not json_output) as progress:
            result = job.extract_features(request, progress)
        if json_output:
            console.print_json(view.features_document(result))
        else:
            view.render_features(result)
