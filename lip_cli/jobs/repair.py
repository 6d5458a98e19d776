"""`lip repair`: PSP + LAP on the classifier layer of a checkpoint, decided by a test and written to a
new file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from lip_cli import __version__, arrays, checkpoint, distributed, files, formats, lip, selection, spectra
from lip_cli.digests import BackgroundDigests, sha256_of
from lip_cli.errors import LipError, outcome_exit_code
from lip_cli.jobs.common import check_statistics, classifier_for, input_files, resolve_device
from lip_cli.labelled import LabelledFeatures, open_labelled_features
from lip_cli.progress import Progress, no_progress
from lip_cli.statistics_pass import FittedPass, project_rows, statistics_pass

AUTO = "auto"


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
    # (k auto: chosen with k); None: lip.DEFAULT_TARGETS, with a given k and with auto
    seed: int = 0
    force_write: bool = False  # write what the evidence withholds: auto's unchanged copy, a refused k
    alpha: float = 0.05  # level of the one-sided McNemar test that confirms a k
    plot: Path | None = None  # the caller draws the figure; checked here with the other outputs
    junit: Path | None = None  # the caller writes the JUnit report; checked here likewise

    def __post_init__(self) -> None:
        if self.targets is None:
            object.__setattr__(self, "targets", lip.DEFAULT_TARGETS)


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
    predictions_changed: tuple[int, int] | None = None  # a given k: (training rows whose predicted
    # class it changes, rows measured on: the accuracy sample)

    @property
    def checked(self) -> bool:
        """Whether rows the network never trained on (a validation set) judged the k written or
        withheld: false for a given k without --val-features and for --k auto without it."""
        return self.decision is not None and self.decision.data == "val"

    @property
    def exit_code(self) -> int:
        return outcome_exit_code(self.outcome, self.forced)

    @property
    def decision_text(self) -> str:
        """The decision in one sentence; for a given k with no validation set, that nothing checked it."""
        if self.decision is not None:
            return self.decision.reason
        return unchecked_text(self.k)

    @property
    def energy_kept(self) -> float:
        return spectra.energy_kept(torch.tensor(self.singular_values_before), self.k)

    @property
    def effective_rank_before(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values_before))

    @property
    def effective_rank_after(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values_after).abs())


def repair_checkpoint(
    request: RepairRequest, progress: Progress = no_progress, note: Callable[[str], None] | None = None
) -> RepairReport:
    """`lip repair`: PSP + LAP on the classifier layer of a checkpoint, written to a new file.

    With k = "auto" the rows that judge k (the validation set, or a seeded held-out share of the
    training rows, left out of the fit used to choose) are split in two: k is chosen on one part
    and applied only when it beats the unrepaired layer on the other by an exact one-sided McNemar
    test at `alpha` (`selection.auto_k`); otherwise the weights stay as they are and nothing is
    written unless `force_write`. A given k is checked for harm on the whole validation set: any
    drop refuses it (`selection.assess_given_k`); with no validation set it is written as asked,
    and the report says that nothing checked it and what it changes on the training rows.
    """
    check_options(request)
    compute_dtype = lip.COMPUTE_DTYPES[request.compute_dtype]
    device = resolve_device(request.device)
    group = distributed.from_environment(device)
    try:
        return _repair(request, compute_dtype, device, group, progress, note)
    finally:
        group.close()


def check_options(request: RepairRequest) -> None:
    """The checks of the options on their own, before any file is read (the callbacks of
    `lip_cli.integrations` run them when they are built)."""
    k = request.k
    if k != AUTO and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise LipError(f"--k {k!r}: is neither a non-negative whole number nor 'auto'")
    if request.targets not in (*lip.TARGETS, selection.AUTO_TARGETS):
        choices = ", ".join((*lip.TARGETS, selection.AUTO_TARGETS))
        raise LipError(f"--targets {request.targets!r}: must be one of {choices}")
    if request.compute_dtype not in lip.COMPUTE_DTYPES:
        dtypes = ", ".join(lip.COMPUTE_DTYPES)
        raise LipError(f"--compute-dtype {request.compute_dtype!r}: must be one of {dtypes}")
    if request.val_labels is not None and request.val_features is None:
        raise LipError("--val-labels needs --val-features")
    auto = k == AUTO
    if auto and request.val_features is None and not 0.0 < request.holdout < 1.0:
        raise LipError(f"--holdout {request.holdout}: must be a fraction between 0 and 1")
    number = isinstance(request.alpha, int | float) and not isinstance(request.alpha, bool)
    if not number or not 0.0 < request.alpha < 1.0:
        raise LipError(f"--alpha {request.alpha}: must be between 0 and 1")
    if request.targets == selection.AUTO_TARGETS and not auto:
        raise LipError("--targets auto chooses the targets together with k: it needs --k auto")


def check_k(k: int | str, rank: int, weight_key: str) -> None:
    """A given k must lie between 0 and the layer's rank."""
    if k != AUTO and not 0 <= int(k) <= rank:
        raise LipError(f"--k {k}: must be between 0 and the rank of `{weight_key}`, {rank}")


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
    if request.junit is not None:
        outputs.append(files.Output(Path(request.junit), suffixes=(".xml",)))
    if output is None:
        return outputs
    source = Path(request.checkpoint)
    deferred = True  # an existing output is refused when written: after every usage and evidence error
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
    """Outputs of a run that may write nothing (--k auto, or a given k that validation checks) that
    exist already, for a note before the work: without --force, the run stops with one line when it
    comes to write them."""
    if request.force or request.dry_run or not _may_withhold(request):
        return []
    output = Path(request.output or files.sibling_output(request.checkpoint))
    found = repair_outputs(request, output)
    return [out.path for out in found if out.deferred and (out.path.exists() or out.path.is_symlink())]


def _may_withhold(request: RepairRequest) -> bool:
    """Whether the evidence may withhold the write: --k auto, or a given k with a validation set."""
    return request.k == AUTO or request.val_features is not None


def _repair(
    request: RepairRequest,
    compute_dtype: torch.dtype,
    device: torch.device,
    group: distributed.Group,
    progress: Progress,
    note: Callable[[str], None] | None = None,
) -> RepairReport:
    """The steps of a repair, as its summary reads: check and load, fit, decide, write, report.

    `note` gets, once the inputs are checked and before the pass, what the run will not check.
    """
    loaded = _check_and_load(request, compute_dtype, device, group)
    if note is not None and request.k != AUTO and request.val_features is None:
        note(unchecked_notice(int(request.k)))
    fitted = _fit(request, loaded, group, progress)
    total = counts_total(group, device)
    decided = _decide(request, loaded, fitted, total, progress, group)
    output = _write(request, loaded, decided, group)
    return _report(request, loaded, fitted, decided, output)


@dataclass
class _Loaded:
    """A repair's inputs, checked and opened: the data, the checkpoint, the layer and its statistics."""

    output: Path | None  # None for --dry-run
    hashing: BackgroundDigests
    digests: dict[str, Future[str]]  # sha256 of the checkpoint and the features, for the provenance
    train: LabelledFeatures
    val: LabelledFeatures | None
    model: checkpoint.Checkpoint
    layer: checkpoint.LinearLayer
    weight: Tensor
    bias: Tensor | None
    stats: lip.LapStatistics  # empty sums; the pass fills them

    @property
    def rank(self) -> int:
        return self.stats.svd.rank


@dataclass
class _Decided:
    """What the evidence decided, and the head it gives."""

    decision: selection.Decision | None  # None: nothing to test a given k on
    k: int
    targets: str
    repaired: lip.RepairedHead
    ks: list[int]  # the ks whose training accuracy is reported
    train_curve: list[float]
    target_scale: float | None
    outcome: str
    withheld: bool  # the outcome withholds the write (unconfirmed, refused)
    warnings: list[str]
    predictions_changed: tuple[int, int] | None  # a given k: (training rows whose prediction changes, rows)


def _check_and_load(
    request: RepairRequest, compute_dtype: torch.dtype, device: torch.device, group: distributed.Group
) -> _Loaded:
    """Check every path, start the digests, open the data, load the checkpoint, find the layer.

    A failure on one rank fails them all, with its message.
    """
    try:
        loaded = _load(request, compute_dtype, device, group)
    except LipError as error:
        group.check(error)  # raises it
        raise
    group.check(None)
    return loaded


def _load(
    request: RepairRequest, compute_dtype: torch.dtype, device: torch.device, group: distributed.Group
) -> _Loaded:
    auto = request.k == AUTO
    output = None if request.dry_run else Path(request.output or files.sibling_output(request.checkpoint))
    files.check_paths(repair_inputs(request), repair_outputs(request, output), request.force)
    hashing = BackgroundDigests()
    digests = {}
    if output is not None and group.leader:
        digests[str(request.checkpoint)] = hashing.submit(sha256_of, request.checkpoint)
        shards = arrays.shard_paths(request.features)
        digests[str(request.features)] = hashing.submit(sha256_of, request.features, shards)

    train = open_labelled_features(request.features, request.labels)
    val = None
    if request.val_features is not None:
        val = open_labelled_features(request.val_features, request.val_labels, "--val-labels")
        if output is not None and group.leader:
            _digest_validation(request, val, hashing, digests)
        if val.features.shape[1] != train.features.shape[1]:
            raise LipError(
                f"{val.features.name}: validation features have {val.features.shape[1]} columns, "
                f"training features {train.features.shape[1]}"
            )
        if auto:
            _check_split_size(val, request.alpha)

    model = checkpoint.load_checkpoint(request.checkpoint)
    layer, weight, bias = classifier_for(model, request.layer, train, val)

    stats = lip.LapStatistics(weight, bias, compute_dtype=compute_dtype, device=device)
    rank = stats.svd.rank
    check_k(request.k, rank, layer.weight_key)
    if output is not None and not _may_withhold(request) and not request.force:
        _check_not_there(repair_outputs(request, output))  # it will be written: say so before the pass
    if not auto and request.targets == "paper":  # the fit needs the tail only, the accuracies a sample
        stats = lip.LapStatistics(
            weight,
            bias,
            compute_dtype=compute_dtype,
            device=device,
            first_component=int(request.k),
            svd=stats.svd,
        )
    return _Loaded(output, hashing, digests, train, val, model, layer, weight, bias, stats)


def _digest_validation(
    request: RepairRequest, val: LabelledFeatures, hashing: BackgroundDigests, digests: dict[str, Future[str]]
) -> None:
    """sha256 of the validation features and of their labels file (when apart), for the provenance."""
    features = Path(request.val_features)  # type: ignore[arg-type]
    digests["val_features"] = hashing.submit(sha256_of, features, arrays.shard_paths(features))
    labels = Path(request.val_labels) if request.val_labels is not None else Path(val.labels.path)
    shards = arrays.shard_paths(labels) if request.val_labels is not None else None
    embedded = features.is_file() and labels.is_file() and os.path.samefile(labels, features)
    if shards is not None or (labels.is_file() and not embedded):
        digests["val_labels"] = hashing.submit(sha256_of, labels, shards)


def _fit(request: RepairRequest, loaded: _Loaded, group: distributed.Group, progress: Progress) -> FittedPass:
    """The one pass over the training features (with --k auto and no validation set, some rows held out)."""
    auto = request.k == AUTO
    fitted = statistics_pass(
        loaded.train,
        loaded.stats,
        chunk_rows=request.chunk_rows,
        holdout=request.holdout if auto and loaded.val is None else 0.0,
        seed=request.seed,
        sample_rows=request.sample_rows,
        progress=progress,
        group=group,
        min_held=selection.minimum_rows(request.alpha),
    )
    check_statistics(fitted.stats, loaded.train)
    return fitted


def _decide(
    request: RepairRequest,
    loaded: _Loaded,
    fitted: FittedPass,
    total: selection.Total,
    progress: Progress,
    group: distributed.Group,
) -> _Decided:
    """Judge k on the rows that can (`_judge_k`), fit the head it gives, and say what the outcome is."""
    auto = request.k == AUTO
    rank = loaded.rank
    decision = _judge_k(request, fitted, loaded.val, total, progress, group)
    k, targets, repaired = decided_head(
        request, decision, fitted.stats, f"{request.checkpoint}: `{loaded.layer.weight_key}`"
    )
    ks = decision.ks if auto and decision is not None else sorted({k, rank})
    train_curve = selection.curve(fitted.stats, fitted.sample, ks, targets, total)
    scale = fitted.stats.target_scale() if targets == "logit-scale" else None
    without_class = int(total(torch.tensor([float(fitted.rows_without_class)], dtype=torch.float64))[0])
    outcome = selection.outcome(decision)
    withheld = withholds(outcome)
    changed = None if auto else selection.prediction_changes(fitted.stats, k, targets, fitted.sample, total)
    warnings = _repair_warnings(request, decision, repaired, loaded.output is not None, scale, without_class)
    if decision is None and not auto:
        before, after = train_curve[ks.index(rank)], train_curve[ks.index(k)]
        warnings.append(_unchecked_warning(k, changed, before, after))
    return _Decided(
        decision, k, targets, repaired, ks, train_curve, scale, outcome, withheld, warnings, changed
    )


def _unchecked_warning(k: int, changed: tuple[int, int] | None, before: float, after: float) -> str:
    """What a given k with no validation set changes, since nothing checked it."""
    moved, rows = changed or (0, 0)
    share = f"{100 * moved / rows:.1f}% of {rows:,}" if rows else "none of the"
    return (
        f"nothing checked k = {k} (no --val-features): it changes the predicted class of {share} "
        f"training rows, training accuracy {100 * before:.2f}% -> {100 * after:.2f}%; the network "
        "trained on these rows, so they cannot show whether it helps: --val-features checks it for harm"
    )


def decided_head(
    request: RepairRequest, decision: selection.Decision | None, stats: lip.LapStatistics, where: str
) -> tuple[int, str, lip.RepairedHead]:
    """The k and targets the decision applies (a given k as given), and the head they give, checked."""
    auto = request.k == AUTO
    k = int(request.k) if decision is None else decision.k
    targets = decision.targets if auto and decision is not None else str(request.targets)
    repaired = lip.repair(stats, k, targets)
    _check_repaired(repaired, where)
    return k, targets, repaired


def withholds(outcome: str) -> bool:
    """Whether an outcome withholds the write (or, in a training loop, the change): unconfirmed, refused."""
    return outcome in (selection.UNCONFIRMED, selection.REFUSED)


def _write(
    request: RepairRequest, loaded: _Loaded, decided: _Decided, group: distributed.Group
) -> Path | None:
    """The repaired checkpoint and its provenance, unless the outcome withholds them (or --dry-run)."""
    output = loaded.output
    if decided.withheld and not request.force_write:
        output = None
    decision = decided.decision
    auto = request.k == AUTO
    if output is not None and group.leader:
        layer = loaded.layer
        updates = {layer.weight_key: decided.repaired.weight.to(loaded.weight.device)}
        provenance = {
            "tool": "lip",
            "lip_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "method": "PSP + LAP (arXiv 2505.16159)",
            "layer": layer.name,
            "weight_key": layer.weight_key,
            "k": decided.k,
            "k_selection": decision.data if auto and decision is not None else "given",
            "decision": unchecked_text(decided.k) if decision is None else decision.reason,
            "outcome": decided.outcome,
            "checked": decision is not None and decision.data == "val",
            "forced": decided.withheld,
            "rank": loaded.rank,
            "targets": decided.targets,
            "input": str(request.checkpoint),
            "input_sha256": loaded.digests[str(request.checkpoint)].result(),
            "features": str(request.features),
            "features_sha256": loaded.digests[str(request.features)].result(),
            "labels": loaded.train.labels_origin,
            **_evidence_provenance(request, loaded, decision),
        }
        checkpoint.write_checkpoint(loaded.model, updates, output, provenance)
    loaded.hashing.shutdown(cancel_futures=True)
    return output


def unchecked_notice(k: int) -> str:
    """The note before a given k with no validation set runs: nothing will check it."""
    return (
        f"--k {k} without --val-features: nothing will check this k; it is written as asked, and the "
        "summary says what it changes on the training rows (which cannot show whether it helps)"
    )


def unchecked_text(k: int) -> str:
    """The decision sentence of a given k with no validation set."""
    return f"k = {k} as given; nothing checked it (no validation set: --val-features)"


def _evidence_provenance(
    request: RepairRequest, loaded: _Loaded, decision: selection.Decision | None
) -> dict[str, object]:
    """What judged k, for the provenance record: the validation files and their digests, the seed
    and level, the split's sizes, the test's counts, p-values and interval (None where none)."""
    val, digests = loaded.val, loaded.digests
    record: dict[str, object] = {
        "val_features": None if request.val_features is None else str(request.val_features),
        "val_features_sha256": digests["val_features"].result() if "val_features" in digests else None,
        "val_labels": None if val is None else val.labels_origin,
        "val_labels_sha256": digests["val_labels"].result() if "val_labels" in digests else None,
        "seed": request.seed,
        "alpha": request.alpha,
        "holdout": request.holdout if request.k == AUTO and val is None else None,
    }
    if decision is None:
        return record
    test = decision.test
    return {
        **record,
        "selection_rows": decision.selection_rows,
        "confirmation_rows": test.rows,
        "discordant_gains": test.gains,
        "discordant_losses": test.losses,
        "p_value": decision.p_value,
        "p_value_drop": decision.p_value_drop,
        "accuracy_change": test.change,
        "ci_accuracy_change": list(decision.interval),
        "ci_level": decision.interval_level,
        "tests": decision.tests,
    }


def _report(
    request: RepairRequest, loaded: _Loaded, fitted: FittedPass, decided: _Decided, output: Path | None
) -> RepairReport:
    auto = request.k == AUTO
    decision, k, ks, rank = decided.decision, decided.k, decided.ks, loaded.rank
    accuracy = {
        "train_before": decided.train_curve[ks.index(rank)],
        "train_after": decided.train_curve[ks.index(k)],
    }
    if decision is not None:
        accuracy[f"{decision.data}_before"] = decision.accuracy(rank)
        accuracy[f"{decision.data}_after"] = decision.accuracy(k)
    repaired, train, val = decided.repaired, loaded.train, loaded.val
    return RepairReport(
        checkpoint=Path(request.checkpoint),
        layer=loaded.layer,
        has_bias=loaded.bias is not None,
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
        warnings=decided.warnings,
        k_curve=_k_curve(ks if auto else [k], ks, decided.train_curve, decision),
        k_selection=decision.data if auto and decision is not None else None,
        accuracy_rows=fitted.sampled_rows,
        other_copies=[copy.name for copy in checkpoint.copies_of(loaded.model, loaded.layer)],
        targets=decided.targets,
        target_scale=decided.target_scale,
        decision=decision,
        outcome=decided.outcome,
        forced=decided.withheld and request.force_write,
        predictions_changed=decided.predictions_changed,
    )


def counts_total(group: distributed.Group, device: torch.device) -> selection.Total:
    """Adds counts over the ranks, on the device the backend reduces on."""
    if not group.active:
        return lambda counts: counts
    return lambda counts: group.sum(counts.to(device)).cpu()


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


def _check_not_there(outputs: list[files.Output]) -> None:
    """An existing output of a run sure to write, refused before the work (after the usage errors)."""
    for out in outputs:
        if out.deferred and os.path.lexists(out.path) and not out.path.exists():
            raise LipError(
                f"{out.path}: is a dangling link (to {os.readlink(out.path)}); "
                "pass --force to replace the link"
            )
        if out.deferred and out.path.exists():
            raise LipError(f"{out.path}: already exists; pass --force to overwrite it")


def _check_split_size(val: LabelledFeatures, alpha: float) -> None:
    check_split_rows(val.features.rows, alpha, val.features.name)


def check_split_rows(rows: int, alpha: float, name: str) -> None:
    """--k auto needs enough validation rows to choose k on one part and confirm it on the other."""
    minimum = selection.minimum_rows(alpha)
    if rows < minimum:
        raise LipError(
            f"{name}: {rows} validation rows are too few to choose k on one part and "
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
    return judge_on_validation(
        request,
        fitted.stats,
        val.features.rows,
        lambda confirm: project_rows(val, fitted.stats, request.chunk_rows, confirm, progress, group),
        total,
    )


def judge_on_validation(
    request: RepairRequest,
    stats: lip.LapStatistics,
    rows: int,
    project: Callable[[Tensor | None], tuple[selection.Rows, selection.Rows]],
    total: selection.Total,
) -> selection.Decision:
    """k judged on `rows` validation rows, the decision `lip repair` and the callbacks of
    `lip_cli.integrations` take alike. With --k auto: a seeded split, k chosen on one part and
    confirmed on the other; a given k: tested on every row. `project(confirm)` gives the projections
    X U of this process's rows: those outside the (n,) `confirm` mask, and those in it (all in the
    first with None); `total` adds counts over processes."""
    auto = request.k == AUTO
    targets, alpha = str(request.targets), request.alpha
    confirm = selection.split_rows(torch.ones(rows, dtype=torch.bool), request.seed) if auto else None
    chooses, confirms = project(confirm)
    if auto:
        return selection.auto_k(stats, chooses, confirms, targets, alpha, "val", total)
    test = selection.compare_heads(stats, int(request.k), targets, chooses, total)
    return selection.assess_given_k(test, int(request.k), stats.svd.rank, alpha)


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
    if decision is not None and decision.given and decision.lower:  # refused: any drop
        before, after = decision.accuracy(decision.rank), decision.accuracy(decision.k)
        advice = (
            "written anyway (--force-write)"
            if request.force_write and writing
            else "not written (--force-write writes it; --k auto writes only a k it confirms)"
        )
        warnings.append(
            f"k = {decision.k} LOWERS validation accuracy from {100 * before:.2f}% to {100 * after:.2f}% "
            f"on {decision.test.rows:,} rows, {selection.significance(decision)}; {advice}"
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
