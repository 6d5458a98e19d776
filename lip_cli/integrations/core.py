"""What the Lightning and Hugging Face callbacks share: one pass over the training loader and one
over the validation loader with lip's streaming statistics, the decision `lip repair` takes (the
same library code: `jobs.repair.judge_on_validation`, `decided_head`, `withholds`), the head
changed in memory only when the outcome allows it, and lip's record of the decision.

Nothing here imports a training framework: each callback says how a batch runs (`BatchRunner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lip_cli import __version__, distributed, lip, selection, spectra
from lip_cli.arrays import FLOAT_DTYPES, ArraySource
from lip_cli.collect import ClassifierInputs
from lip_cli.errors import LipError
from lip_cli.jobs.common import check_sums, finite_or_fail
from lip_cli.jobs.repair import (
    AUTO,
    RepairRequest,
    check_k,
    check_options,
    check_split_rows,
    counts_total,
    decided_head,
    judge_on_validation,
    withholds,
)
from lip_cli.labelled import check_labels

TRAINING = "the training loader"
VALIDATION = "the validation loader"
NO_VALIDATION = (
    "no validation loader: only rows the network never trained on can confirm a change; weights unchanged"
)
BatchRunner = Callable[[Any], tuple[Callable[[], object], Tensor]]
"""A batch -> (a call that runs the model on its inputs, its labels)."""


def request_for(
    k: int | str = AUTO,
    targets: str | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    layer: str | None = None,
    force_write: bool = False,
    compute_dtype: str = "float32",
) -> RepairRequest:
    """The options of `lip repair` for a model in memory, checked as the command checks them (and
    with its defaults: targets follow k as `RepairRequest` decides)."""
    if layer is not None and not isinstance(layer, str):
        raise LipError(f"--layer {layer!r}: must be a module name such as `fc` or `classifier`")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise LipError(f"--seed {seed!r}: must be a whole number between 0 and 2**63 - 1")
    request = RepairRequest(
        checkpoint=Path("<the model in memory>"),
        features=Path(TRAINING),
        val_features=Path(VALIDATION),
        k=k,
        targets=targets,
        alpha=alpha,
        seed=seed,
        layer=layer,
        force_write=bool(force_write),
        compute_dtype=compute_dtype,
        dry_run=True,
    )
    check_options(request)
    return request


def process_group() -> distributed.Group:
    """The torch.distributed group the trainer started (DDP), or a lone process; lip never ends it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return distributed.Group(dist.get_rank(), dist.get_world_size())
    return distributed.Group()


def rows_of_this_process(loader: object) -> int | None:
    """The rows a DistributedSampler gives this process before it pads the ranks to equal length
    (it repeats rows that other ranks see), or None: every row the loader yields counts."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(
        loader, "sampler", None
    )
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]
    return None


@dataclass
class LipDecision:
    """What a callback decided: the record kept with the model and the figures logged."""

    outcome: str
    k: int
    rank: int
    changed: bool  # whether the head in memory changed
    record: dict[str, Any] = field(default_factory=dict)  # plain types: safe with weights_only loads
    metrics: dict[str, float] = field(default_factory=dict)


def _source(tensor: Tensor, name: str) -> ArraySource:
    return ArraySource(Path(name), None, tuple(tensor.shape), tensor.dtype, lambda a, b: tensor[a:b])


def _stream(
    classifier: ClassifierInputs,
    batches: Iterable,
    run: BatchRunner,
    where: str,
    limit: int | None,
    classes: int,
    take: Callable[[Tensor, Tensor], None],
) -> None:
    """The classifier's inputs and the labels of each batch, checked, given to `take`."""
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            break
        call, labels = run(batch)
        features = classifier.capture(call)
        labels = torch.as_tensor(labels)
        if labels.shape[:1] != features.shape[:1]:
            raise LipError(f"{where}: a batch has {features.shape[0]} inputs but {labels.shape[0]} labels")
        if limit is not None:
            features, labels = features[: limit - seen], labels[: limit - seen]
        if features.shape[0] == 0:
            continue
        finite_or_fail(features, f"{where}: what `{classifier.name}` receives")
        check_labels(_source(labels, where), _source(features, where), classes)
        take(features, labels)
        seen += int(features.shape[0])


def _all_gather_count(group: distributed.Group, count: int) -> list[int]:
    if not group.active:
        return [count]
    import torch.distributed as dist

    counts: list[int | None] = [None] * group.world_size
    dist.all_gather_object(counts, count)
    return [int(value or 0) for value in counts]


def decide_in_memory(
    model: nn.Module,
    request: RepairRequest,
    train: Iterable | None,
    val: Iterable | None,
    run: BatchRunner,
    limits: tuple[int | None, int | None] = (None, None),
) -> LipDecision:
    """One no-grad pass over `train` and one over `val` collecting what the classifier receives,
    then `lip repair`'s decision on the validation rows; the head changes in memory only when the
    outcome allows it (or `force_write` for a refused k). Under torch.distributed each process
    streams its own share, the sums and counts are added over the processes, the validation rows
    are ordered rank by rank (as `lip repair` under torchrun orders a file's rows), and the head
    rank 0 decided is broadcast, so every rank holds the same one."""
    group = process_group()
    classifier = ClassifierInputs(model, request.layer)
    module = classifier.module
    weight, bias = module.weight, module.bias
    where = f"`{classifier.name}`"
    if weight.dtype not in FLOAT_DTYPES:
        raise LipError(
            f"{where}: the weight is {str(weight.dtype).removeprefix('torch.')}; lip needs floating point"
        )
    finite_or_fail(weight.detach(), f"{where}: the weight")
    compute_dtype = lip.COMPUTE_DTYPES[request.compute_dtype]
    stats = lip.LapStatistics(weight, bias, compute_dtype=compute_dtype, device=weight.device)
    rank = stats.svd.rank
    check_k(request.k, rank, f"{classifier.name}.weight")
    classes = stats.num_classes
    kept: list[tuple[Tensor, Tensor]] = []
    passes = [
        (train, TRAINING, limits[0], lambda x, y: stats.update(x, y)),
        (
            val,
            VALIDATION,
            limits[1],
            lambda x, y: kept.append((stats.full_projection(x), y.to(stats.device))),
        ),
    ]
    was_training = model.training
    model.eval()
    try:
        with classifier, torch.no_grad():
            for batches, name, limit, take in passes:
                failure = None
                try:
                    if batches is not None:
                        _stream(classifier, batches, run, name, limit, classes, take)
                except LipError as error:
                    failure = error
                group.check(failure)  # a failure on one rank fails them all, with its message
    finally:
        model.train(was_training)
    if group.active:
        stats.all_reduce()
    if stats.samples == 0:
        raise LipError(f"{TRAINING}: no batches: nothing to fit")
    check_sums(stats, TRAINING, TRAINING)
    auto = request.k == AUTO
    decision, reason, val_rows = _judge(request, stats, kept, group)
    if decision is None and auto:  # nothing can confirm a k: the layer as it is
        k, targets = rank, str(request.targets)
        repaired = lip.repair(stats, k, targets)
        outcome = selection.UNCONFIRMED
    else:
        k, targets, repaired = decided_head(request, decision, stats, where)
        outcome = selection.outcome(decision)
    apply = outcome != selection.UNCONFIRMED and (not withholds(outcome) or request.force_write)
    if apply:
        new_weight = repaired.weight.to(weight.device)
        if group.active:  # rank 0's head on every rank
            group_broadcast(new_weight)
        with torch.no_grad():
            weight.copy_(new_weight)
    result = LipDecision(outcome, k, rank, apply)
    result.record = _record(
        request, classifier.name, decision, reason, result, targets, repaired, stats, val_rows
    )
    result.metrics = _metrics(result.record)
    return result


def group_broadcast(tensor: Tensor) -> None:
    import torch.distributed as dist

    dist.broadcast(tensor, src=0)


def _judge(
    request: RepairRequest,
    stats: lip.LapStatistics,
    kept: list[tuple[Tensor, Tensor]],
    group: distributed.Group,
) -> tuple[selection.Decision | None, str]:
    """The command's decision on this process's validation rows (all ranks' together), or None with
    the reason there is none."""
    count = sum(int(z.shape[0]) for z, _ in kept)
    counts = _all_gather_count(group, count)
    rows, offset = sum(counts), sum(counts[: group.rank])
    auto = request.k == AUTO
    if rows == 0:
        if auto:
            return None, NO_VALIDATION, rows
        return None, f"k = {request.k} as given; nothing checked it (no validation loader)", rows
    if auto:
        try:
            check_split_rows(rows, request.alpha, VALIDATION)
        except LipError as error:
            return None, f"{error}; weights unchanged", rows
    z = (
        torch.cat([part for part, _ in kept])
        if kept
        else stats.full_projection(torch.zeros(0, stats.in_features))
    )
    y = (
        torch.cat([labels for _, labels in kept])
        if kept
        else torch.zeros(0, dtype=torch.long, device=stats.device)
    )

    def project(confirm: Tensor | None) -> tuple[selection.Rows, selection.Rows]:
        if confirm is None:
            return [(z, y)], []
        mine = confirm[offset : offset + count].to(z.device)
        return [(z[~mine], y[~mine])], [(z[mine], y[mine])]

    decision = judge_on_validation(request, stats, rows, project, counts_total(group, stats.device))
    return decision, decision.reason, rows


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _record(
    request: RepairRequest,
    layer: str,
    decision: selection.Decision | None,
    reason: str,
    result: LipDecision,
    targets: str,
    repaired: lip.RepairedHead,
    stats: lip.LapStatistics,
    val_rows: int,
) -> dict[str, Any]:
    """lip's record of the decision, in plain types; the `test` entry is the JSON's (`lip repair --json`)."""
    from lip_cli.render.repair import decision_document

    before = repaired.singular_values_before
    after = repaired.singular_values_after if result.changed else before
    return {
        "tool": "lip",
        "lip_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": "PSP + LAP (arXiv 2505.16159)",
        "layer": layer,
        "k": result.k,
        "rank": result.rank,
        "requested_k": request.k,
        "targets": targets,
        "alpha": request.alpha,
        "seed": request.seed,
        "outcome": result.outcome,
        "changed": result.changed,
        "forced": result.changed and withholds(result.outcome),
        "decision": reason,
        "train_rows": stats.samples,
        "val_rows": val_rows,
        "effective_rank_before": spectra.effective_rank(before),
        "effective_rank_after": spectra.effective_rank(after.abs()),
        "energy_kept": spectra.energy_kept(before, result.k),
        "singular_values_before": before.tolist(),
        "singular_values_after": after.tolist(),
        "test": decision_document(decision),
    }


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of the record a logger takes, under `lip/`."""
    test = record["test"] or {}
    low, high = test.get("ci_accuracy_change") or (None, None)
    values = {
        "k": record["k"],
        "rank": record["rank"],
        "changed": float(record["changed"]),
        "confirmed": float(record["outcome"] == selection.REPAIRED),
        "effective_rank": record["effective_rank_before"],
        "effective_rank_after": record["effective_rank_after"],
        "energy_kept": record["energy_kept"],
        "p_value": test.get("p_value"),
        "accuracy_change": test.get("accuracy_change"),
        "ci_low": low,
        "ci_high": high,
        "confirmation_rows": test.get("confirmation_rows"),
        "smallest_detectable_gain": test.get("smallest_detectable_gain"),
        "validation_rows_for_1pt_gain": test.get("validation_rows_for_1pt_gain"),
    }
    return {f"lip/{name}": float(value) for name, value in values.items() if _finite(value) is not None}


def spectrum_summary(weight: Tensor, first_v: Tensor | None) -> tuple[dict[str, float], Tensor, list[float]]:
    """The head's spectrum over training: effective and stable rank, the top 10% energy, and phi of
    its top singular directions against those of `first_v` (the first epoch's), with its V and values."""
    w = weight.detach().to(device="cpu", dtype=torch.float64).T  # (q, l)
    _, values, vh = torch.linalg.svd(w, full_matrices=False)
    v = vh.T
    top = max(1, math.ceil(0.1 * values.numel()))
    summary = {
        "lip/effective_rank": spectra.effective_rank(values),
        "lip/stable_rank": spectra.stable_rank(values),
        "lip/top_energy": spectra.top_energy_share(values),
    }
    if first_v is not None:
        summary["lip/phi_first_epoch"] = spectra.subspace_similarity(first_v, v, top, top)
    return summary, v, values.tolist()
