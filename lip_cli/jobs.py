"""What each command does, as plain functions: read the inputs, run the core, write the outputs.

No terminal here: progress goes to an optional callback and results come back as dataclasses that
`report` renders for people (rich) or machines (JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lip_cli import (
    __version__,
    arrays,
    checkpoint,
    distributed,
    files,
    formats,
    layout,
    lip,
    selection,
    spectra,
)
from lip_cli.errors import LipError, outcome_exit_code

AUTO = "auto"
Progress = Callable[[str, int, int], None]
"""Called as progress(task, rows done, rows in all) while a pass streams over a file."""


def _no_progress(task: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class LabelledFeatures:
    features: arrays.ArraySource
    labels: arrays.ArraySource
    labels_origin: str


def open_labelled_features(features: Path, labels: Path | None, option: str = "--labels") -> LabelledFeatures:
    """Features and their labels, found in the documented order (the labels file given, the
    features file's own labels array, the labels file beside it), alike for training and validation
    features; `option` is the one that passes the labels (--labels, --val-labels).

    `features` may also be a glob or a folder of shards (see `arrays.open_sharded`).
    """
    shards = arrays.shard_paths(features)
    if shards is not None:
        return LabelledFeatures(*arrays.open_sharded(shards, labels, features, option))
    feature_source, embedded = arrays.open_features(features)
    label_source, origin = arrays.find_labels(features, labels, embedded, option)
    return LabelledFeatures(feature_source, label_source, origin)


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LipError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise LipError(f"--device {device}: not a device torch knows ({error})") from error


def _minimum_classes(train: LabelledFeatures) -> int:
    """Classes the labels need (largest id + 1), once the row counts agree (from the headers)."""
    labels = train.labels
    arrays.check_label_rows(labels, train.features)
    if len(labels.shape) == 1 and not labels.dtype.is_floating_point and labels.dtype != torch.bool:
        return arrays.label_range(labels)[1] + 1
    return 1


def _finite_or_fail(tensor: Tensor, where: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise LipError(f"{where} holds NaN or Inf values")


def _classifier_for(
    model: checkpoint.Checkpoint,
    name: str | None,
    train: LabelledFeatures,
    val: LabelledFeatures | None = None,
) -> tuple[checkpoint.LinearLayer, Tensor, Tensor | None]:
    """The classifier layer that fits the features and labels, its weight and bias, all checked."""
    min_classes = _minimum_classes(train)
    widths = [
        layer.out_features
        for layer in checkpoint.linear_layers(model.state)
        if layer.in_features == train.features.shape[1]
    ]
    if name is None and arrays.label_classes(train.labels) is None and widths and min_classes > max(widths):
        raise LipError(
            f"{train.labels.name}: holds class id {min_classes - 1}, but the widest layer taking "
            f"{train.features.shape[1]} inputs has {max(widths)} classes"
        )
    layer = checkpoint.find_layer(
        model,
        name,
        in_features=train.features.shape[1],
        num_classes=arrays.label_classes(train.labels),
        min_classes=min_classes,
    )
    for data in (train, val):
        if data is not None:
            arrays.check_labels(data.labels, data.features, layer.out_features)
    _refuse_empty(model, layer)
    weight, bias = _layer_tensors(model, layer)
    return layer, weight, bias


def _layer_tensors(
    model: checkpoint.Checkpoint, layer: checkpoint.LinearLayer
) -> tuple[Tensor, Tensor | None]:
    """The layer's weight and bias, refused unless they are dense, real, finite floating point."""
    weight = model.state[layer.weight_key]
    bias = model.state[layer.bias_key] if layer.bias_key else None
    for key, tensor in ((layer.weight_key, weight), (layer.bias_key, bias)):
        if tensor is None:
            continue
        where = f"{model.path}: `{key}`"
        problem = arrays.tensor_problem(tensor)
        if problem is not None:
            raise LipError(f"{where} {problem}")
        if tensor.dtype not in arrays.FLOAT_DTYPES:
            raise LipError(
                f"{where} is {str(tensor.dtype).removeprefix('torch.')}; lip reads and writes float16, "
                "bfloat16, float32 and float64 weights only (a repaired weight would not fit this type); "
                "convert the layer to floating point first"
            )
        _finite_or_fail(tensor, where)
    largest = float(weight.abs().max()) if weight.numel() else 0.0
    if not math.isfinite(largest * largest * weight.numel()):  # the spectrum's energy is a float64 sum
        raise LipError(
            f"{model.path}: `{layer.weight_key}` holds values up to {largest:.3g}: its squared norm "
            "overflows float64; rescale the layer"
        )
    return weight, bias


def _refuse_empty(model: checkpoint.Checkpoint, layer: checkpoint.LinearLayer) -> None:
    """A layer with no inputs or no classes has no spectrum to repair or compare."""
    if layer.out_features == 0 or layer.in_features == 0:
        raise LipError(f"{model.path}: `{layer.weight_key}` is {layer.shape_text}: an empty layer")


def _check_statistics(stats: lip.LapStatistics, data: LabelledFeatures) -> None:
    """Refuse LAP sums that overflowed, naming the input that is too large.

    An overflowed sum would otherwise pass for a direction the features never excite, or give NaN.
    """
    if not all(bool(torch.isfinite(stats.sums[name]).all()) for name in ("square", "projection")):
        if stats.compute_dtype != torch.float64:
            dtype = str(stats.compute_dtype).removeprefix("torch.")
            raise LipError(
                f"{data.features.name}: the features overflow {dtype} in the LAP sums; "
                "use --compute-dtype float64"
            )
        raise LipError(f"{data.features.name}: the features are too large: their LAP sums overflow float64")
    if not all(bool(torch.isfinite(value).all()) for value in stats.sums.values()):
        raise LipError(
            f"{data.labels.name}: the labels are too large: their LAP sums overflow; "
            "use class ids or 0/1 targets"
        )


def _check_repaired(repaired: lip.RepairedHead, where: str) -> None:
    """Nothing non-finite is written: the fitted spectrum and the weight in its own dtype."""
    if not bool(torch.isfinite(repaired.singular_values_after).all()):
        raise LipError(f"{where}: the fitted singular values overflow float64; rescale the features")
    if not bool(torch.isfinite(repaired.weight).all()):
        dtype = str(repaired.weight.dtype).removeprefix("torch.")
        raise LipError(
            f"{where}: the repaired weight overflows {dtype} (singular values up to "
            f"{float(repaired.singular_values_after.abs().max()):.3g}); rescale the features"
        )


SAMPLE_ROWS = 16384
"""Rows each accuracy curve is measured on (training rows, and held-out rows apart): an accuracy's
standard error is at most 0.5 / sqrt(16384) = 0.39 points, a difference between two k on the same
rows far less. More rows cost time, not precision that matters: each row costs about two products
of its projections with the head."""


def _seeded_subset(candidates: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A mask of `size` rows drawn uniformly from the rows set in `candidates` (all when fewer)."""
    if int(candidates.sum()) <= size:
        return candidates.clone()
    chosen = candidates.nonzero().squeeze(1)
    subset = torch.zeros_like(candidates)
    subset[chosen[torch.randperm(chosen.numel(), generator=generator)[:size]]] = True
    return subset


class RowBlock:
    """Chosen rows of (projections, labels) chunks, gathered into one block allocated once.

    One block rather than a list of chunks lets an accuracy curve share its rows evenly between
    threads, and costs no copy at the end.
    """

    def __init__(self, chosen: Tensor) -> None:
        self._chosen = chosen  # (n,) bool over the rows that will be offered, in order
        self._offered = self._filled = 0
        self._z: Tensor | None = None
        self._y: Tensor | None = None

    def next_index(self, rows: int) -> Tensor:
        """Indices of the chosen rows among the next `rows` offered."""
        first, self._offered = self._offered, self._offered + rows
        return self._chosen[first : self._offered].nonzero().squeeze(1)

    def add(self, z: Tensor, y: Tensor) -> None:
        """Offer the next chunk of rows; the chosen ones are kept."""
        index = self.next_index(z.shape[0]).to(z.device)
        self._place(index.numel(), z, y, lambda out, rows: torch.index_select(rows, 0, index, out=out))

    def store(self, z: Tensor, y: Tensor) -> None:
        """Keep rows already chosen (`next_index`)."""
        self._place(z.shape[0], z, y, lambda out, rows: out.copy_(rows))

    def _place(self, count: int, z: Tensor, y: Tensor, fill: Callable[[Tensor, Tensor], object]) -> None:
        y = y.to(z.device)
        if self._z is None or self._y is None:
            size = int(self._chosen.sum())
            self._z, self._y = z.new_empty((size, *z.shape[1:])), y.new_empty((size, *y.shape[1:]))
        end = self._filled + count
        fill(self._z[self._filled : end], z)
        fill(self._y[self._filled : end], y)
        self._filled = end

    def rows(self) -> selection.Rows:
        if self._z is None or self._y is None:
            return []
        return [(self._z[: self._filled], self._y[: self._filled])]


@dataclass
class FittedPass:
    """One streaming pass over the training data: LAP statistics, and projections kept for accuracy.

    `sample` holds X U and the labels of a seeded uniform sample of the training rows (all of them
    when they fit the memory budget), so that accuracies for any k need no second pass. With a
    holdout, the held-out rows of that sample are also kept in two seeded parts: one chooses k,
    the other confirms it (`selection.auto_k`).
    """

    stats: lip.LapStatistics  # every training row
    fit_stats: lip.LapStatistics  # the rows not held out (the same object without a holdout)
    sample: selection.Rows
    held_selection: selection.Rows
    held_confirmation: selection.Rows
    sampled_rows: int
    rows_without_class: int = 0  # label-matrix rows with no positive target (this process's share)


def statistics_pass(
    data: LabelledFeatures,
    stats: lip.LapStatistics,
    chunk_rows: int,
    holdout: float = 0.0,
    seed: int = 0,
    sample_rows: int | None = None,
    progress: Progress = _no_progress,
    group: distributed.Group = distributed.Group(),
    min_held: int = 1,
) -> FittedPass:
    """Stream the training data once: accumulate LAP sums, keep the projections of a sample.

    With `holdout`, a seeded share of the rows is accumulated apart (to choose k on rows the fit
    has not seen) and merged back afterwards; at least `min_held` of them must be in the sample.
    Under torchrun each rank streams its share of the rows (the seeded masks are the same on every
    rank) and the sums are added over the ranks; a failure on any rank fails every rank with its
    message.
    """
    rows = data.features.rows
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(rows, dtype=torch.bool)
    if holdout > 0:
        held = torch.rand(rows, generator=generator) < holdout  # (n,)
        if not 0 < int(held.sum()) < rows:
            raise LipError(
                f"--holdout {holdout}: leaves no samples on one side of {rows}; "
                "pass --val-features or another --holdout"
            )
    sample_rows = SAMPLE_ROWS if sample_rows is None else sample_rows
    sampled = _seeded_subset(torch.ones(rows, dtype=torch.bool), sample_rows, generator)
    held_kept = _seeded_subset(held, sample_rows, generator)  # the held-out rows' own sample
    confirm = torch.zeros(rows, dtype=torch.bool)
    if holdout > 0:
        held_rows = int(held_kept.sum())
        if held_rows < min_held and held_rows < int(held.sum()):  # the sample kept too few of them
            raise LipError(
                f"--sample-rows {sample_rows}: keeps {held_rows} held-out rows, too few to choose k on one "
                f"part and confirm it on the other; --k auto needs at least {min_held}: pass a larger "
                "--sample-rows"
            )
        if held_rows < min_held:
            raise LipError(
                f"--holdout {holdout}: {held_rows} held-out rows are too few to choose k on one part "
                f"and confirm it on the other; --k auto needs at least {min_held}: pass --val-features "
                "or a larger --holdout"
            )
        confirm = selection.split_rows(held_kept, seed)  # (n,) the held-out rows that confirm k
    held_stats = stats.copy() if holdout > 0 else None
    share = slice(*group.rows(rows))
    sample = RowBlock(sampled[share])
    held_selection, held_confirmation = RowBlock(held_kept[share] & ~confirm[share]), RowBlock(confirm[share])
    kept_rows = None  # the rows not held out, copied into one buffer: a fresh one costs page faults
    rows_without_class = 0
    failure = None
    try:
        for start, x, y in _batches(data, chunk_rows, "statistics", progress, group.rows(rows)):
            z = stats.project(x)  # (n, r)
            stop = start + x.shape[0]
            y = y.to(z.device)
            if y.ndim == 2 and y.shape[0]:
                rows_without_class += int((y.amax(dim=1) <= 0).sum())
            if held_stats is None:
                stats.accumulate(z, y)
            else:  # two disjoint parts: all rows less the held ones would leave, in a direction
                # only the held rows excite, their rounding for a fit made of nothing
                is_held = held[start:stop].to(z.device)
                kept = (~is_held).nonzero().squeeze(1)
                if kept_rows is None:  # chunks hold at most chunk_rows rows, and all rows fewer
                    kept_rows = z.new_empty((min(chunk_rows, held.shape[0]), z.shape[1]))
                stats.accumulate(torch.index_select(z, 0, kept, out=kept_rows[: kept.numel()]), y[kept])
                held_stats.accumulate(z[is_held], y[is_held])
                held_selection.add(z, y)
                held_confirmation.add(z, y)
            if stats.first_component:  # the tail's sums, but every direction for the accuracies
                index = sample.next_index(x.shape[0])
                sample.store(stats.full_projection(x[index.to(x.device)]), y[index.to(y.device)])
            else:
                sample.add(z, y)
    except LipError as error:
        failure = error
    group.check(failure)
    if group.active:
        for accumulator in (stats, held_stats):
            if accumulator is not None:
                accumulator.all_reduce()
    fit_stats = stats
    if held_stats is not None:
        stats = fit_stats.copy()
        stats.merge(held_stats)
    parts = sample.rows(), held_selection.rows(), held_confirmation.rows()
    return FittedPass(stats, fit_stats, *parts, int(sampled.sum()), rows_without_class)


def project_rows(
    data: LabelledFeatures,
    stats: lip.LapStatistics,
    chunk_rows: int,
    confirm: Tensor | None = None,
    progress: Progress = _no_progress,
    group: distributed.Group = distributed.Group(),
) -> tuple[selection.Rows, selection.Rows]:
    """Stream a labelled set once: its projections X U, apart from the `confirm` rows (n,) if given."""
    rows = data.features.rows
    confirm = torch.zeros(rows, dtype=torch.bool) if confirm is None else confirm
    share = slice(*group.rows(rows))
    chooses, confirms = RowBlock(~confirm[share]), RowBlock(confirm[share])
    failure = None
    try:
        for _, x, y in _batches(data, chunk_rows, "validation", progress, group.rows(rows)):
            z = stats.full_projection(x)  # (n, r)
            chooses.add(z, y)
            confirms.add(z, y)
    except LipError as error:
        failure = error
    group.check(failure)
    return chooses.rows(), confirms.rows()


def _counts_total(group: distributed.Group, device: torch.device) -> selection.Total:
    """Adds counts over the ranks, on the device the backend reduces on."""
    if not group.active:
        return lambda counts: counts
    return lambda counts: group.sum(counts.to(device)).cpu()


@dataclass(frozen=True)
class RepairRequest:
    """Everything `lip repair` needs; the defaults are the command's defaults."""

    checkpoint: Path
    features: Path
    k: int | str  # a number of components, or "auto"
    labels: Path | None = None
    layer: str | None = None
    output: Path | None = None
    val_features: Path | None = None
    val_labels: Path | None = None
    device: str = "cpu"
    compute_dtype: str = "float32"
    chunk_rows: int = 16384
    force: bool = False
    dry_run: bool = False
    holdout: float = 0.1  # share of training samples held out to choose k when there is no val set
    sample_rows: int | None = None  # rows kept for each accuracy curve; None: SAMPLE_ROWS
    targets: str | None = None  # "paper", "logit-scale" (labels scaled to the head's logit margin), "auto"
    # (k auto: chosen with k); None: logit-scale with k = "auto" (the most confirmed repairs on the
    # accuracy benchmark, benchmarks/RESULTS.md), the paper's formula with a given k
    seed: int = 0
    force_write: bool = False  # write what the evidence withholds: auto's unchanged copy, a refused k
    alpha: float = 0.05  # level of the one-sided McNemar test that confirms a k
    plot: Path | None = None  # the caller draws the figure; checked here with the other outputs

    def __post_init__(self) -> None:
        if self.targets is None:
            object.__setattr__(self, "targets", "logit-scale" if self.k == AUTO else "paper")


@dataclass
class RepairReport:
    """What a repair did: the layer, the spectrum before and after, accuracies, the output."""

    checkpoint: Path
    layer: checkpoint.LinearLayer
    has_bias: bool
    samples: int
    k: int
    rank: int
    labels_origin: str
    singular_values_before: list[float]
    singular_values_after: list[float]
    unexcited: list[int]
    accuracy: dict[str, float]
    output: Path | None
    val_labels_origin: str | None = None
    warnings: list[str] = field(default_factory=list)
    k_curve: list[dict[str, float]] = field(default_factory=list)  # {k, train_accuracy[, val_accuracy]}
    k_selection: str | None = None  # with k = "auto": "val" or "holdout", the data k was chosen on
    accuracy_rows: int = 0  # training rows the training (and held-out) accuracies are measured on
    other_copies: list[str] = field(default_factory=list)  # the same layer elsewhere (EMA, wrappers)
    targets: str = "paper"
    target_scale: float | None = None  # c of the logit-scale targets
    decision: selection.Decision | None = None  # the test that decided k (None: no rows to test on)
    outcome: str = selection.UNCHECKED  # what the evidence says (`selection.outcome`)
    forced: bool = False  # --force-write asked for a write that the outcome withholds

    @property
    def exit_code(self) -> int:
        return outcome_exit_code(self.outcome, self.forced)

    @property
    def decision_text(self) -> str:
        """The decision in one sentence; for a given k with no validation set, that nothing checked it."""
        if self.decision is not None:
            return self.decision.reason
        return f"k = {self.k} as given; nothing checked it (no validation set: --val-features)"

    @property
    def energy_kept(self) -> float:
        return spectra.energy_kept(torch.tensor(self.singular_values_before), self.k)

    @property
    def effective_rank_before(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values_before))

    @property
    def effective_rank_after(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values_after).abs())


def _batches(
    data: LabelledFeatures,
    chunk_rows: int,
    task: str,
    progress: Progress,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first row, features, labels) chunks of a data set (or of a range of its rows)."""
    first, end = rows if rows is not None else (0, data.features.rows)
    for start, x, y in arrays.iter_batches(data.features, data.labels, chunk_rows, (first, end)):
        yield start, x, y
        progress(task, min(start + chunk_rows, end) - first, end - first)


def repair_checkpoint(request: RepairRequest, progress: Progress = _no_progress) -> RepairReport:
    """`lip repair`: PSP + LAP on the classifier layer of a checkpoint, written to a new file.

    With k = "auto" the rows that judge k (the validation set, or a seeded held-out share of the
    training rows, left out of the fit used to choose) are split in two: k is chosen on one part
    and applied only when it beats the unrepaired layer on the other by an exact one-sided McNemar
    test at `alpha` (`selection.auto_k`); otherwise the weights stay as they are and nothing is
    written unless `force_write`. A given k is tested the same way on the whole validation set.
    """
    if request.val_labels is not None and request.val_features is None:
        raise LipError("--val-labels needs --val-features")
    auto = request.k == AUTO
    if auto and request.val_features is None and not 0.0 < request.holdout < 1.0:
        raise LipError(f"--holdout {request.holdout}: must be a fraction between 0 and 1")
    if not 0.0 < request.alpha < 1.0:
        raise LipError(f"--alpha {request.alpha}: must be between 0 and 1")
    if request.targets == selection.AUTO_TARGETS and not auto:
        raise LipError("--targets auto chooses the targets together with k: it needs --k auto")
    compute_dtype = lip.COMPUTE_DTYPES[request.compute_dtype]
    device = resolve_device(request.device)
    group = distributed.from_environment(device)
    try:
        return _repair(request, compute_dtype, device, group, progress)
    finally:
        group.close()


def input_files(
    checkpoints: list[Path],
    features: Path | None = None,
    labels: Path | None = None,
    copied: bool = False,
) -> list[Path]:
    """Every file a command reads, for the path policy (`files.check_paths`).

    Checkpoints with their provenance records (and, when the folder is `copied`, every file of a
    model folder, each checked), feature and label shards, and the labels file beside the features
    (`layout.beside_labels`) when no labels are given.
    """
    found: list[Path] = []
    for model in map(Path, checkpoints):
        found += [model, checkpoint.sidecar_path(model)]
        if model.is_dir():
            found += files.folder_files(model) if copied else [model / files.LIP_RECORD]
    for spec in (features, labels):
        if spec is not None:
            found += arrays.shard_paths(spec) or [Path(spec)]
    if features is not None and labels is None and arrays.shard_paths(features) is None:
        found.append(layout.beside_labels(Path(features)))
    return found


def repair_inputs(request: RepairRequest) -> list[Path]:
    """Every file `lip repair` reads."""
    return [
        *input_files([request.checkpoint], request.features, request.labels, copied=True),
        *input_files([], request.val_features, request.val_labels),
    ]


def repair_outputs(request: RepairRequest, output: Path | None) -> list[files.Output]:
    """Every file `lip repair` writes: the checkpoint (in the input's format), its provenance
    sidecar (.pt) and the figure."""
    outputs = [] if request.plot is None else [files.Output(Path(request.plot))]
    if output is None:
        return outputs
    source = Path(request.checkpoint)
    deferred = request.k == AUTO  # may write nothing: an existing output is refused when written
    if source.is_dir():
        return [files.Output(output, folder=True, deferred=deferred), *outputs]
    content = formats.detect_format(source) if source.is_file() and request.output else None
    own = (source.suffix.lower(),)  # the default output keeps the input's naming; so may --output
    sidecar = files.Output(checkpoint.sidecar_path(output), deferred=deferred)
    if content in formats.TORCH_FORMATS:
        torch_file = files.Output(output, suffixes=formats.TORCH_SUFFIXES + own, deferred=deferred)
        return [torch_file, sidecar, *outputs]
    if content == formats.SAFETENSORS:
        return [files.Output(output, suffixes=(".safetensors", *own), deferred=deferred), *outputs]
    sidecars = [sidecar] if checkpoint.writes_sidecar(source) else []
    return [files.Output(output, deferred=deferred), *sidecars, *outputs]


def outputs_in_the_way(request: RepairRequest) -> list[Path]:
    """Outputs of a --k auto run that exist already, for a note before the work: without --force,
    the run stops with one line when it comes to write them (it may write nothing)."""
    if request.k != AUTO or request.force or request.dry_run:
        return []
    output = Path(request.output or files.sibling_output(request.checkpoint))
    found = repair_outputs(request, output)
    return [out.path for out in found if out.deferred and (out.path.exists() or out.path.is_symlink())]


def _repair(
    request: RepairRequest,
    compute_dtype: torch.dtype,
    device: torch.device,
    group: distributed.Group,
    progress: Progress,
) -> RepairReport:
    auto = request.k == AUTO
    failure = None
    try:  # a failure on one rank fails them all, with its message
        output = None if request.dry_run else Path(request.output or files.sibling_output(request.checkpoint))
        files.check_paths(repair_inputs(request), repair_outputs(request, output), request.force)
        hashing = files.BackgroundDigests()
        digests = {}
        if output is not None and group.leader:
            digests[str(request.checkpoint)] = hashing.submit(files.sha256_of, request.checkpoint)
            shards = arrays.shard_paths(request.features)
            digests[str(request.features)] = hashing.submit(files.sha256_of, request.features, shards)

        train = open_labelled_features(request.features, request.labels)
        val = None
        if request.val_features is not None:
            val = open_labelled_features(request.val_features, request.val_labels, "--val-labels")
            if val.features.shape[1] != train.features.shape[1]:
                raise LipError(
                    f"{val.features.name}: validation features have {val.features.shape[1]} columns, "
                    f"training features {train.features.shape[1]}"
                )
            if auto:
                _check_split_size(val, request.alpha)

        model = checkpoint.load_checkpoint(request.checkpoint)
        layer, weight, bias = _classifier_for(model, request.layer, train, val)

        stats = lip.LapStatistics(weight, bias, compute_dtype=compute_dtype, device=device)
        rank = stats.svd.rank
        if not auto and not 0 <= int(request.k) <= rank:
            raise LipError(f"--k {request.k}: must be between 0 and the rank of `{layer.weight_key}`, {rank}")
        if not auto and request.targets == "paper":  # the fit needs the tail only, the accuracies a sample
            stats = lip.LapStatistics(
                weight,
                bias,
                compute_dtype=compute_dtype,
                device=device,
                first_component=int(request.k),
                svd=stats.svd,
            )
    except LipError as error:
        failure = error
    group.check(failure)
    fitted = statistics_pass(
        train,
        stats,
        chunk_rows=request.chunk_rows,
        holdout=request.holdout if auto and val is None else 0.0,
        seed=request.seed,
        sample_rows=request.sample_rows,
        progress=progress,
        group=group,
        min_held=selection.minimum_rows(request.alpha),
    )
    _check_statistics(fitted.stats, train)
    total = _counts_total(group, device)
    decision = _judge_k(request, fitted, val, total, progress, group)
    k = int(request.k) if decision is None else decision.k
    targets = decision.targets if auto and decision is not None else request.targets
    repaired = lip.repair(fitted.stats, k, targets)
    _check_repaired(repaired, f"{request.checkpoint}: `{layer.weight_key}`")
    ks = decision.ks if auto and decision is not None else sorted({k, rank})
    train_curve = selection.curve(fitted.stats, fitted.sample, ks, targets, total)
    scale = fitted.stats.target_scale() if targets == "logit-scale" else None
    without_class = int(total(torch.tensor([float(fitted.rows_without_class)], dtype=torch.float64))[0])
    outcome = selection.outcome(decision)
    withheld = outcome in (selection.UNCONFIRMED, selection.REFUSED)
    warnings = _repair_warnings(request, decision, repaired, output is not None, scale, without_class)
    if withheld and not request.force_write:
        output = None
    if output is not None and group.leader:
        updates = {layer.weight_key: repaired.weight.to(weight.device)}
        provenance = {
            "tool": "lip",
            "lip_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "method": "PSP + LAP (arXiv 2505.16159)",
            "layer": layer.name,
            "weight_key": layer.weight_key,
            "k": k,
            "k_selection": decision.data if auto and decision is not None else "given",
            "decision": None if decision is None else decision.reason,
            "outcome": outcome,
            "rank": rank,
            "targets": targets,
            "input": str(request.checkpoint),
            "input_sha256": digests[str(request.checkpoint)].result(),
            "features": str(request.features),
            "features_sha256": digests[str(request.features)].result(),
            "labels": train.labels_origin,
        }
        checkpoint.write_checkpoint(model, updates, output, provenance)
    hashing.shutdown(cancel_futures=True)

    accuracy = {"train_before": train_curve[ks.index(rank)], "train_after": train_curve[ks.index(k)]}
    if decision is not None:
        accuracy[f"{decision.data}_before"] = decision.accuracy(rank)
        accuracy[f"{decision.data}_after"] = decision.accuracy(k)
    return RepairReport(
        checkpoint=Path(request.checkpoint),
        layer=layer,
        has_bias=bias is not None,
        samples=train.features.rows,
        k=k,
        rank=rank,
        labels_origin=train.labels_origin,
        val_labels_origin=None if val is None else val.labels_origin,
        singular_values_before=repaired.singular_values_before.tolist(),
        singular_values_after=repaired.singular_values_after.tolist(),
        unexcited=list(repaired.unexcited),
        accuracy=accuracy,
        output=output,
        warnings=warnings,
        k_curve=_k_curve(ks if auto else [k], ks, train_curve, decision),
        k_selection=decision.data if auto and decision is not None else None,
        accuracy_rows=fitted.sampled_rows,
        other_copies=[copy.name for copy in checkpoint.copies_of(model, layer)],
        targets=targets,
        target_scale=scale,
        decision=decision,
        outcome=outcome,
        forced=withheld and request.force_write,
    )


def _check_split_size(val: LabelledFeatures, alpha: float) -> None:
    rows, minimum = val.features.rows, selection.minimum_rows(alpha)
    if rows < minimum:
        raise LipError(
            f"{val.features.name}: {rows} validation rows are too few to choose k on one part and "
            f"confirm it on the other; --k auto needs at least {minimum} at --alpha {alpha:g}"
        )


def _judge_k(
    request: RepairRequest,
    fitted: FittedPass,
    val: LabelledFeatures | None,
    total: selection.Total,
    progress: Progress,
    group: distributed.Group,
) -> selection.Decision | None:
    """With --k auto: k chosen on one part and confirmed on the other. A given k: tested on the
    whole validation set. None when there is nothing to test it on."""
    auto = request.k == AUTO
    targets, alpha = request.targets, request.alpha
    if val is None:
        if not auto:
            return None
        held = fitted.held_selection, fitted.held_confirmation
        return selection.auto_k(fitted.fit_stats, *held, targets, alpha, "holdout", total)
    rows = val.features.rows
    confirm = selection.split_rows(torch.ones(rows, dtype=torch.bool), request.seed) if auto else None
    chooses, confirms = project_rows(val, fitted.stats, request.chunk_rows, confirm, progress, group)
    if auto:
        return selection.auto_k(fitted.stats, chooses, confirms, targets, alpha, "val", total)
    test = selection.compare_heads(fitted.stats, int(request.k), targets, chooses, total)
    return selection.assess_given_k(test, int(request.k), fitted.stats.svd.rank, alpha)


def _repair_warnings(
    request: RepairRequest,
    decision: selection.Decision | None,
    repaired: lip.RepairedHead,
    writing: bool,
    target_scale: float | None = None,
    rows_without_class: int = 0,
) -> list[str]:
    warnings = []
    if rows_without_class:
        warnings.append(
            f"{rows_without_class:,} training rows have no class with a positive target (an empty "
            "candidate set): LAP fits them to zero logits and every accuracy counts them wrong"
        )
    if target_scale is not None and target_scale <= 0:
        warnings.append(
            f"the head's logits do not rise with the labels (c = {target_scale:.3g}): logit-scale targets "
            "point away from the labels; --targets paper fits the labels themselves"
        )
    if decision is not None and decision.given and decision.test.change < 0:
        before, after = decision.accuracy(decision.rank), decision.accuracy(decision.k)
        refused = decision.outcome == selection.REFUSED
        advice = "consider --k auto"
        if refused:
            advice = (
                "written anyway (--force-write)"
                if request.force_write and writing
                else "not written (--force-write writes it; --k auto writes only a k it confirms)"
            )
        warnings.append(
            f"k = {decision.k} LOWERS validation accuracy from {100 * before:.2f}% to {100 * after:.2f}% "
            f"on {decision.test.rows:,} rows, {selection.significance(decision)}"
            + (f" at --alpha {decision.alpha:g}" if refused else "")
            + f"; {advice}"
        )
    if repaired.unexcited:
        warnings.append(
            f"{len(repaired.unexcited)} tail direction(s) are never excited by the features and "
            f"keep their old singular values: {list(repaired.unexcited[:10])}"
        )
    if decision is not None and not decision.given:
        unwritten = writing and not request.force_write
        if decision.data == "holdout":
            needed = decision.power.validation_rows_for_one_point if decision.power else None
            held = f"{decision.selection_rows:,} held-out training rows"
            found = (
                f"k = {decision.best_k} would be tried (best on {held}), but such rows cannot confirm it"
                if decision.best_k != decision.rank
                else f"no k beats the unrepaired layer on {held}, and such rows could not confirm one"
            )
            warnings.append(
                f"--k auto without --val-features: {found}: {selection.TRAINED_ON}; "
                + ("nothing written" if unwritten else "weights unchanged")
                + ": pass --val-features, rows the network never trained on (their labels may be noisy)"
                + (f"; about {needed:,} of them detect a 1-point gain 80% of the time" if needed else "")
            )
        elif not decision.confirmed:
            warnings.append(
                decision.reason + (", nothing written (--force-write writes a copy)" if unwritten else "")
            )
    return warnings


def _k_curve(
    shown: list[int], ks: list[int], train_curve: list[float], decision: selection.Decision | None
) -> list[dict[str, float]]:
    """{k, train_accuracy[, val_accuracy]} for the ks shown; val_accuracy is on the rows that chose k
    (the selection part), or for a given k on the whole validation set."""
    points = []
    for k in shown:
        point = {"k": k, "train_accuracy": train_curve[ks.index(k)]}
        if decision is not None:
            given = decision.given
            point["val_accuracy"] = (
                decision.accuracy(k) if given else decision.selection_accuracies[decision.ks.index(k)]
            )
        points.append(point)
    return points


ENERGY_LEVELS = (0.9, 0.95, 0.99)


@dataclass(frozen=True)
class LayerSpectrum:
    """Spectral statistics of one 2-D weight, seen as W = weight.T."""

    name: str
    shape: tuple[int, int]  # torch layout: (out_features, in_features)
    dtype: str
    singular_values: list[float]
    rank: int
    is_classifier: bool = False

    @property
    def shape_text(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}"

    @property
    def spectral_norm(self) -> float:
        return self.singular_values[0] if self.singular_values else 0.0

    @property
    def stable_rank(self) -> float:
        return spectra.stable_rank(torch.tensor(self.singular_values, dtype=torch.float64))

    @property
    def effective_rank(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values, dtype=torch.float64))

    @property
    def top_energy(self) -> float:
        """Share of the energy in the top 10% of the components."""
        return spectra.top_energy_share(torch.tensor(self.singular_values, dtype=torch.float64))

    @property
    def cumulative_energy(self) -> list[float]:
        return spectra.energy(torch.tensor(self.singular_values, dtype=torch.float64)).tolist()

    @property
    def k_for_energy(self) -> dict[float, int]:
        values = torch.tensor(self.singular_values, dtype=torch.float64)
        return {level: spectra.k_for_energy(values, level) for level in ENERGY_LEVELS}


def layer_spectrum(
    model: checkpoint.Checkpoint, layer: checkpoint.LinearLayer, is_classifier: bool = False
) -> LayerSpectrum:
    weight, _ = _layer_tensors(model, layer)
    values = spectra.singular_values(weight)
    return LayerSpectrum(
        name=layer.name,
        shape=(layer.out_features, layer.in_features),
        dtype=str(layer.dtype).removeprefix("torch."),
        singular_values=values.tolist(),
        rank=spectra.numerical_rank(values, (layer.out_features, layer.in_features)),
        is_classifier=is_classifier,
    )


@dataclass
class InspectReport:
    """`lip inspect` without --layer: every 2-D weight of a checkpoint."""

    checkpoint: Path
    layers: list[LayerSpectrum]
    other_tensors: int  # tensors that are not 2-D weights (biases, norms, convolutions, buffers)
    provenance: dict | None = None  # what lip recorded when it wrote this checkpoint


def inspect_checkpoint(path: Path, progress: Progress = _no_progress) -> InspectReport:
    model = checkpoint.load_checkpoint(path)
    layers = checkpoint.linear_layers(model.state)
    if not layers:
        raise LipError(f"{path}: holds no 2-D weight")
    classifier = checkpoint.likely_classifier(model)
    spectra_list = []
    for index, layer in enumerate(layers):
        spectra_list.append(layer_spectrum(model, layer, is_classifier=layer == classifier))
        progress("spectra", index + 1, len(layers))
    return InspectReport(
        Path(path), spectra_list, len(model.state) - len(layers), checkpoint.read_provenance(path)
    )


@dataclass
class LayerReport:
    """`lip inspect --layer`: one layer's full spectrum, and the accuracy each k would give."""

    checkpoint: Path
    spectrum: LayerSpectrum
    samples: int | None = None
    labels_origin: str | None = None
    k_curve: list[dict[str, float]] | None = None  # {k, train_accuracy} after PSP + LAP at k
    accuracy_rows: int | None = None  # training rows the accuracies are measured on
    provenance: dict | None = None  # what lip recorded when it wrote this checkpoint


def inspect_layer(
    path: Path,
    layer_name: str | None,
    features: Path | None = None,
    labels: Path | None = None,
    device: str = "cpu",
    chunk_rows: int = 16384,
    progress: Progress = _no_progress,
) -> LayerReport:
    """The spectrum of one layer; with features, the training accuracy after LAP for every k."""
    if labels is not None and features is None:
        raise LipError("--labels needs --features")
    model = checkpoint.load_checkpoint(path)
    if features is None:
        layer = (
            checkpoint.layer_by_name(model, layer_name) if layer_name else checkpoint.likely_classifier(model)
        )
        return LayerReport(
            Path(path),
            layer_spectrum(model, layer, is_classifier=True),
            provenance=checkpoint.read_provenance(path),
        )
    train = open_labelled_features(features, labels)
    layer, weight, bias = _classifier_for(model, layer_name, train)
    stats = lip.LapStatistics(weight, bias, device=resolve_device(device))
    fitted = statistics_pass(train, stats, chunk_rows, progress=progress)
    _check_statistics(fitted.stats, train)
    ks = selection.k_grid(stats.svd.rank)
    accuracies = selection.curve(fitted.stats, fitted.sample, ks)
    return LayerReport(
        checkpoint=Path(path),
        spectrum=layer_spectrum(model, layer, is_classifier=True),
        samples=train.features.rows,
        labels_origin=train.labels_origin,
        k_curve=[{"k": k, "train_accuracy": accuracy} for k, accuracy in zip(ks, accuracies, strict=True)],
        accuracy_rows=fitted.sampled_rows,
        provenance=checkpoint.read_provenance(path),
    )


def series_labels(paths: Sequence[Path], labels: Sequence[str] = ()) -> list[str]:
    """Names of a series of checkpoints: `labels` when given, else the file stems, made unique.

    Stems that collide take as many parent folders as it takes to tell them apart
    (`run1/model`, `run2/model`); a file given twice is numbered.
    """
    if labels:
        if len(labels) != len(paths):
            raise LipError(
                f"--label given {len(labels)} times for {len(paths)} checkpoints; give one per checkpoint"
            )
        return list(labels)
    parts = [Path(path).with_suffix("").parts or (str(path),) for path in paths]
    names = []
    for mine in parts:
        others = [theirs for theirs in parts if theirs != mine]
        depth = 1
        while depth < len(mine) and any(theirs[-depth:] == mine[-depth:] for theirs in others):
            depth += 1
        names.append("/".join(mine[-depth:]))
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name} ({seen[name]})")
    return unique


@dataclass
class SeriesReport:
    """`lip inspect A B C ...`: one layer across a series of checkpoints, in the order given."""

    labels: list[str]
    layers: list[LayerReport]

    @property
    def layer(self) -> str:
        return self.layers[0].spectrum.name


def inspect_series(
    paths: Sequence[Path],
    layer_name: str | None = None,
    labels: Sequence[str] = (),
    progress: Progress = _no_progress,
) -> SeriesReport:
    """The spectrum of one layer in each checkpoint: `layer_name`, else the likely classifier of the
    first checkpoint, found by its name in the others.

    Every layer must have the shape of the first one; a checkpoint that fails (unreadable, no such
    layer, another shape) fails the whole series with its name.
    """
    names = series_labels(paths, labels)
    layers: list[LayerReport] = []
    for index, path in enumerate(paths):
        report = inspect_layer(path, layer_name or (layers[0].spectrum.name if layers else None))
        first = layers[0].spectrum if layers else report.spectrum
        if report.spectrum.shape != first.shape:
            raise LipError(
                f"`{first.name}` is {first.shape_text} in {paths[0]} but `{report.spectrum.name}` is "
                f"{report.spectrum.shape_text} in {path}; only layers of the same shape compare"
            )
        layers.append(report)
        progress("spectra", index + 1, len(paths))
    return SeriesReport(names, layers)


def comparison_sizes(rank: int) -> list[int]:
    """The subspace sizes shown in a comparison: 1, 2, 5, 10, 20, 50, ... up to the rank."""
    sizes = [size for base in (1, 2, 5) for size in (base * 10**e for e in range(7)) if size < rank]
    return sorted(set(sizes)) + [rank]


@dataclass
class CompareReport:
    """`lip compare`: one layer in two checkpoints, as in the paper's analysis."""

    checkpoint_a: Path
    checkpoint_b: Path
    layer: str
    spectrum_a: LayerSpectrum
    spectrum_b: LayerSpectrum
    sizes: list[int]
    phi: list[list[float]]  # phi[a][b] = phi(V_A, V_B, sizes[a], sizes[b])
    largest_angle_degrees: dict[int, float]  # top-k subspaces of V_A and V_B
    phi_matrix: Tensor  # (r, r): phi for every i, j, for the heatmap

    @property
    def ratio(self) -> list[float | None]:
        return [
            b / a if a > 0 else None
            for a, b in zip(self.spectrum_a.singular_values, self.spectrum_b.singular_values, strict=True)
        ]


def compare_checkpoints(a: Path, b: Path, layer_name: str | None = None) -> CompareReport:
    """Spectra, subspace similarity phi(i, j) and principal angles of one layer in two checkpoints."""
    return compare_series(a, [b], layer_name)[0]


def compare_series(
    reference: Path,
    others: Sequence[Path],
    layer_name: str | None = None,
    progress: Progress = _no_progress,
) -> list[CompareReport]:
    """One layer of each checkpoint in `others` against the same layer of `reference`, in order.

    The layer is `layer_name`, else the likely classifier of the reference; the reference is read
    and decomposed once. Any checkpoint without the layer, or with it in another shape, fails the
    whole series with its name.
    """
    model_a = checkpoint.load_checkpoint(reference)
    layer_a = (
        checkpoint.layer_by_name(model_a, layer_name) if layer_name else checkpoint.likely_classifier(model_a)
    )
    _refuse_empty(model_a, layer_a)
    weight_a, _ = _layer_tensors(model_a, layer_a)
    v_a = spectra.right_singular_vectors(weight_a)
    spectrum_a = layer_spectrum(model_a, layer_a, is_classifier=True)
    del model_a, weight_a
    sizes = comparison_sizes(v_a.shape[1])
    reports = []
    for index, b in enumerate(others):
        model_b = checkpoint.load_checkpoint(b)
        layer_b = checkpoint.layer_by_name(model_b, layer_name or layer_a.name)
        if (layer_a.out_features, layer_a.in_features) != (layer_b.out_features, layer_b.in_features):
            raise LipError(
                f"`{layer_a.name}` is {layer_a.shape_text} in {reference} but {layer_b.shape_text} in {b}; "
                "only layers of the same shape compare"
            )
        weight_b, _ = _layer_tensors(model_b, layer_b)
        v_b = spectra.right_singular_vectors(weight_b)
        phi_matrix = spectra.subspace_similarity_matrix(v_a, v_b)
        reports.append(
            CompareReport(
                checkpoint_a=Path(reference),
                checkpoint_b=Path(b),
                layer=layer_a.name,
                spectrum_a=spectrum_a,
                spectrum_b=layer_spectrum(model_b, layer_b, is_classifier=True),
                sizes=sizes,
                phi=[[float(phi_matrix[i - 1, j - 1]) for j in sizes] for i in sizes],
                largest_angle_degrees={
                    k: float(spectra.principal_angles(v_a, v_b, k)[-1].rad2deg()) for k in sizes
                },
                phi_matrix=phi_matrix,
            )
        )
        progress("comparisons", index + 1, len(others))
    return reports


@dataclass(frozen=True)
class FeaturesRequest:
    """Everything `lip features` needs; the defaults are the command's defaults."""

    checkpoint: Path
    model: str
    data: Path
    out: Path
    labels: Path | None = None
    layer: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    num_workers: int = 0
    dtype: str = "float32"
    limit: int | None = None
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    force: bool = False
    model_args: tuple[tuple[str, str], ...] = ()  # --model-arg KEY=VALUE, for a python: factory


@dataclass
class FeaturesReport:
    checkpoint: Path
    features: Path
    labels: Path
    classes_file: Path | None
    samples: int
    feature_dim: int
    layer: str
    model: str
    seconds: float
    validation: bool = False  # named like validation data (`layout.is_validation`)
    other_split: Path | None = None  # the other split's cache beside it, when there (`layout.counterpart`)


def _worker_message(error: Exception) -> str | None:
    """The LipError message inside an exception a DataLoader worker re-raised, if there is one."""
    for line in reversed(str(error).splitlines()):
        if "LipError: " in line:
            return line.split("LipError: ", 1)[1]
    return None


def extract_features(request: FeaturesRequest, progress: Progress = _no_progress) -> FeaturesReport:
    """`lip features`: run a model over images or inputs and cache what its classifier receives."""
    import time

    from torch.utils.data import DataLoader, Subset

    from lip_cli import features, models

    started = time.perf_counter()
    device = resolve_device(request.device)
    out = Path(request.out)
    if out.suffix.lower() != ".npy":
        raise LipError(f"--out {out}: the feature cache is a .npy file")
    classes_file = layout.classes_file(out)
    images = Path(request.data).suffix.lower() != ".npy"  # else model inputs in a .npy
    model_folder = [Path(request.model[3:])] if request.model.startswith("hf:") else []
    labels_out = layout.labels_file(out)
    files.check_paths(
        [*input_files([request.checkpoint, *model_folder]), Path(request.data), request.labels],
        [
            files.Output(out, parents=True),
            files.Output(labels_out, parents=True),
            files.Output(classes_file, parents=True) if images else None,
        ],
        request.force,
    )
    built = models.build_model(request.model, request.checkpoint, request.model_args)
    if not images:
        if request.labels is None:
            raise LipError(f"{request.data}: model inputs in a .npy need --labels")
        dataset: Any = models.ArrayInputs(request.data, request.labels)
        class_names = None
    else:
        dataset = models.ImageFolderData(request.data)
        dataset.transform = models.eval_transform(built, request.image_size, request.mean, request.std)
        class_names = dataset.classes
    if request.limit is not None:
        dataset = Subset(dataset, range(min(request.limit, len(dataset))))
    total = len(dataset)
    loader = DataLoader(dataset, batch_size=request.batch_size, num_workers=request.num_workers)
    done = [0]

    def advance(rows: int) -> None:
        done[0] += rows
        progress("features", done[0], total)

    name, module = features.classifier_module(built.model, request.layer)
    with files.new_folders(out):  # made only now that the model and the data are known to load
        try:
            features.collect_features(
                built.model,
                loader,
                name,
                out,
                request.dtype,
                device,
                advance,
                force=request.force,
                inputs_name=f"--data {request.data}",
            )
        except LipError:
            raise
        except Exception as error:  # a worker's LipError comes back wrapped in its own exception type
            message = _worker_message(error)
            if message is None:
                raise
            raise LipError(message) from error
        if class_names:
            with files.atomic_output(classes_file) as temporary:
                temporary.write_text(json.dumps(class_names, indent=1) + "\n")
    return FeaturesReport(
        checkpoint=Path(request.checkpoint),
        features=out,
        labels=labels_out,
        classes_file=classes_file if class_names else None,
        samples=total,
        feature_dim=module.in_features,
        layer=name,
        model=request.model,
        seconds=time.perf_counter() - started,
        validation=layout.is_validation(out),
        other_split=layout.counterpart(out),
    )
