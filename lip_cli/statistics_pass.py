"""The one streaming pass over the training features: LAP sums, and the projections of a seeded
sample (and of held-out rows) kept for the accuracy curves; and the pass over a validation set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lip_cli import arrays, distributed, lip, selection
from lip_cli.errors import LipError
from lip_cli.labelled import LabelledFeatures
from lip_cli.progress import Progress, no_progress

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


def statistics_pass(
    data: LabelledFeatures,
    stats: lip.LapStatistics,
    chunk_rows: int,
    holdout: float = 0.0,
    seed: int = 0,
    sample_rows: int | None = None,
    progress: Progress = no_progress,
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
    progress: Progress = no_progress,
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
