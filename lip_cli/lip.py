"""PSP + LAP (Si et al., arXiv 2505.16159) as pure tensor functions: no files, no terminal.

Notation of the paper: X (n, q) features at the input of the classifier, Y (n, l) label targets,
W (q, l) = weight.T with W = U S V^T. PSP keeps the top-k triplets; LAP re-fits each tail singular
value with U and V fixed:

    sigma_i = <X u_i, (Y - 1 b^T) v_i> / ||X u_i||^2

The tail terms decouple because the v_i are orthonormal, so one pass of per-component sums over the
samples gives the fit for every k at once. The sums add across chunks, shards and processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeVar

import torch
from torch import Tensor

from lip_cli.spectra import numerical_rank

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
T = TypeVar("T")


def one_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `function` in a worker thread whose torch runs on one thread; the caller's stay as set.

    For LAPACK's SVD and other chains of small parallel steps, one thread is faster on two cores and
    many times faster on a busy machine, where each step waits for the slowest of the threads.
    """
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return pool.submit(function, *args, **kwargs).result()


@dataclass(frozen=True)
class HeadSVD:
    """Thin SVD of W = weight.T (q, l), cut to its numerical rank r, in float64."""

    u: Tensor  # (q, r)
    s: Tensor  # (r,) descending
    v: Tensor  # (l, r)

    @property
    def rank(self) -> int:
        return int(self.s.numel())


def head_svd(weight: Tensor) -> HeadSVD:
    """SVD of the classifier weight (torch layout, (l, q)) as the paper's W = weight.T."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float64).T  # (q, l)
    u, s, vh = one_thread(torch.linalg.svd, w, full_matrices=False)
    rank = numerical_rank(s, tuple(w.shape))
    return HeadSVD(u=u[:, :rank].contiguous(), s=s[:rank].clone(), v=vh[:rank].T.contiguous())


TARGETS = ("paper", "logit-scale")
DEFAULT_TARGETS = "logit-scale"  # everywhere; chosen on benchmarks/defaults.py's criterion (DEFAULTS.md)


def _column_squares(z: Tensor, block_rows: int = 256) -> Tensor:
    """sum_n z_ni^2 per column, in blocks of rows on the CPU: a chunk-sized temporary costs page faults."""
    if z.device.type != "cpu":
        return (z * z).sum(0)
    total = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
    for block in z.split(block_rows):
        total += (block * block).sum(0)
    return total


class LapStatistics:
    """Per-component sums over samples that LAP needs, for every singular direction of a head.

    For direction i the paper's fit is sigma_i = sum_n (x_n . u_i)((y_n - b) . v_i) / sum_n (x_n . u_i)^2.
    Feed batches with `update`, combine partial sums with `merge` (or `all_reduce` under
    torch.distributed), then call `repair(stats, k)` for any k. With `first_component=k0` only
    directions k0.. are tracked: cheaper when k >= k0 is known (paper targets only). `svd` reuses
    a head's SVD already taken.

    The sums also serve a variant (targets="logit-scale"): the targets are the labels centred and
    scaled to the head's own logit margin, T_n = c (y_n - mean(y_n)) + mean(f_n), with c the
    least-squares scale of the centred logits f onto the centred labels.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        first_component: int = 0,
        svd: HeadSVD | None = None,
    ) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.svd = head_svd(weight) if svd is None else svd
        self.compute_dtype = compute_dtype
        self.device = torch.device(device) if device is not None else weight.device
        if not 0 <= first_component <= self.svd.rank:
            raise ValueError(f"first_component must be between 0 and the rank {self.svd.rank}")
        self.first_component = first_component
        bias64 = (
            torch.zeros(self.num_classes, dtype=torch.float64)
            if bias is None
            else bias.detach().to(device="cpu", dtype=torch.float64)
        )
        v_all = self.svd.v  # (l, r) float64
        tracked = slice(first_component, None)
        self._u = self.svd.u[:, tracked].to(self.device, compute_dtype)  # (q, m), m = r - k0
        self._v = v_all[:, tracked].to(self.device, compute_dtype)  # (l, m)
        self._u_all = self._u if first_component == 0 else self.svd.u.to(self.device, compute_dtype)
        self._v_all = self._v if first_component == 0 else v_all.to(self.device, compute_dtype)
        self._bias = bias64.to(self.device, compute_dtype)  # (l,)
        self._bias_v = bias64 @ v_all[:, tracked]  # (m,) float64
        self._ones_v = v_all[:, tracked].sum(0)  # (m,) float64: 1^T v_i
        # with every direction tracked, the logits are X U S V^T + b: their class mean and each class
        self._scaled_v = (v_all * self.svd.s).to(self.device, compute_dtype)  # (l, r): rows s * v_c
        self._mean_weights = (self.svd.s * v_all.mean(0)).to(self.device, compute_dtype)  # (r,)
        width = self.svd.rank - first_component
        zeros = lambda: torch.zeros(width, dtype=torch.float64, device=self.device)  # noqa: E731
        scalar = lambda: torch.zeros(1, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums: dict[str, Tensor] = {
            "label": zeros(),  # sum_n z_ni (y_n . v_i)
            "projection": zeros(),  # sum_n z_ni
            "square": zeros(),  # sum_n z_ni^2
            "logit_mean": zeros(),  # sum_n z_ni mean(f_n)
            "label_mean": zeros(),  # sum_n z_ni mean(y_n)
            "cross": scalar(),  # sum_n <f_n - mean(f_n), y_n - mean(y_n)>
            "spread": scalar(),  # sum_n ||y_n - mean(y_n)||^2
        }
        self.samples = 0

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def numerator(self) -> Tensor:
        """sum_n (x_n . u_i)((y_n - b) . v_i): the paper's numerator, per tracked direction."""
        return self.sums["label"] - self._bias_v.to(self.device) * self.sums["projection"]

    @property
    def denominator(self) -> Tensor:
        """sum_n (x_n . u_i)^2 per tracked direction."""
        return self.sums["square"]

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add one batch: features (n, q); labels (n,) class ids or (n, l) targets."""
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels in this batch")
        self.accumulate(self.project(features), labels)

    def project(self, features: Tensor) -> Tensor:
        """X U for a batch, (n, m) in the compute dtype: the one product LAP needs."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must be (n, {self.in_features}), got {tuple(features.shape)}")
        return features.to(self.device, self.compute_dtype) @ self._u

    def full_projection(self, features: Tensor) -> Tensor:
        """X U over every direction, (n, r), tracked or not: what the logits of any k need."""
        if self.first_component == 0:
            return self.project(features)
        return features.to(self.device, self.compute_dtype) @ self._u_all

    def accumulate(self, projections: Tensor, labels: Tensor) -> None:
        """Add a batch given as its projections X U (from `project`) and its labels."""
        z = projections  # (n, m)
        labels = labels.to(self.device)
        classes = self.num_classes
        full = self.first_component == 0
        logit_mean = z @ self._mean_weights + self._bias.mean() if full else None  # (n,)
        if labels.ndim == 1:
            ids = labels.long()
            class_sums = torch.zeros(classes, z.shape[1], dtype=z.dtype, device=z.device)
            class_sums.index_add_(0, ids, z)  # (l, m): sum of z over each class
            projection = class_sums.sum(0)
            label_part = (class_sums * self._v).sum(0)
            label_mean = projection / classes
            if full:
                labelled_logits = (class_sums * self._scaled_v).sum() + self._bias[ids].sum()
                cross = labelled_logits - logit_mean.sum()  # sum_n f_{n,y_n} - mean(f_n)
                spread = torch.tensor(z.shape[0] * (1 - 1 / classes), dtype=torch.float64)
        else:
            projection = z.sum(0)
            y = labels.to(self.compute_dtype)  # (n, l)
            label_part = (z * (y @ self._v)).sum(0)
            y_mean = y.mean(1)  # (n,)
            label_mean = z.T @ y_mean
            if full:
                logits = z @ self._scaled_v.T + self._bias  # (n, l)
                cross = ((logits - logit_mean[:, None]) * (y - y_mean[:, None])).sum()
                spread = ((y - y_mean[:, None]) ** 2).sum()
        additions = {
            "label": label_part,
            "projection": projection,
            "square": _column_squares(z),
            "label_mean": label_mean,
        }
        if full:
            additions |= {
                "logit_mean": z.T @ logit_mean,
                "cross": cross.reshape(1),
                "spread": spread.reshape(1),
            }
        for name, value in additions.items():
            self.sums[name] += value.to(device=self.device, dtype=torch.float64)  # chunk sums, then float64
        self.samples += int(z.shape[0])

    def copy(self) -> LapStatistics:
        """An independent accumulator with the same head and the same sums so far."""
        twin = copy.copy(self)
        twin.sums = {name: value.clone() for name, value in self.sums.items()}
        return twin

    def merge(self, other: LapStatistics) -> None:
        """Add the sums of another accumulator built on the same head."""
        self._check_same_head(other)
        for name, value in other.sums.items():
            self.sums[name] += value.to(self.device)
        self.samples += other.samples

    def _check_same_head(self, other: LapStatistics) -> None:
        same = other.first_component == self.first_component and other.svd.rank == self.svd.rank
        if not same or not torch.equal(other.weight, self.weight):
            raise ValueError("cannot combine statistics of different heads")

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the statistics over all processes of a torch.distributed group, in place."""
        import torch.distributed as dist

        names = list(self.sums)
        samples = torch.tensor([float(self.samples)], dtype=torch.float64, device=self.device)
        packed = torch.cat([*(self.sums[name] for name in names), samples])
        dist.all_reduce(packed, group=group)
        parts = packed[:-1].split([self.sums[name].numel() for name in names])
        self.sums = {name: part.clone() for name, part in zip(names, parts, strict=True)}
        self.samples = int(packed[-1].item())

    def target_scale(self) -> float:
        """c of the logit-scale targets: the least-squares scale of the centred logits on the labels."""
        spread = float(self.sums["spread"])
        return float(self.sums["cross"]) / spread if spread > 0 else 0.0

    def fitted_singular_values(self, targets: str = DEFAULT_TARGETS) -> tuple[Tensor, Tensor]:
        """LAP's closed-form sigma for every direction, and a mask of the directions excited.

        A direction the features never excite (||X u_i|| = 0 to rounding) has no least-squares
        fit; it keeps its old value there, as do directions before `first_component`.
        """
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
        if targets == "paper":
            numerator = self.numerator
        else:
            if self.first_component:
                raise ValueError(
                    "logit-scale targets (the default) need statistics of every direction "
                    "(first_component=0); targets='paper' fits the tail alone"
                )
            ones_v, bias_v = self._ones_v.to(self.device), self._bias_v.to(self.device)
            sums = self.sums
            numerator = (
                self.target_scale() * (sums["label"] - ones_v * sums["label_mean"])
                + ones_v * sums["logit_mean"]
                - bias_v * sums["projection"]
            )
        denominator = self.denominator
        scale = denominator.max() if denominator.numel() else torch.tensor(0.0)
        excited = denominator > max(float(scale), 1e-300) * 1e-12
        safe_denominator = torch.where(excited, denominator, 1.0)
        old = self.svd.s[self.first_component :].to(self.device)
        fitted = torch.where(excited, numerator / safe_denominator, old)
        # directions before first_component are not tracked: they keep their values
        all_fitted, all_excited = self.svd.s.clone(), torch.ones(self.svd.rank, dtype=torch.bool)
        all_fitted[self.first_component :], all_excited[self.first_component :] = fitted.cpu(), excited.cpu()
        return all_fitted, all_excited


@dataclass(frozen=True)
class RepairedHead:
    """A repaired classifier weight (torch layout, original dtype) and its spectrum change."""

    weight: Tensor  # (l, q)
    k: int
    singular_values_before: Tensor  # (r,) float64
    singular_values_after: Tensor  # (r,) float64
    unexcited: tuple[int, ...]  # tail directions kept as they were: the features never excite them


def singular_values_for_k(
    stats: LapStatistics, k: int, targets: str = DEFAULT_TARGETS
) -> tuple[Tensor, tuple[int, ...]]:
    """The spectrum after PSP (top k kept) + LAP (tail re-fitted), and the tail left unfitted."""
    rank = stats.svd.rank
    if not 0 <= k <= rank:
        raise ValueError(f"k must be between 0 and the rank {rank}, got {k}")
    if k < stats.first_component:
        raise ValueError(
            f"these statistics track directions {stats.first_component}.. only; k must be >= that"
        )
    fitted, excited = stats.fitted_singular_values(targets)
    after = stats.svd.s.clone()
    after[k:] = fitted[k:]
    unexcited = tuple(int(i) for i in torch.nonzero(~excited[k:]).flatten() + k)
    return after, unexcited


def repair(stats: LapStatistics, k: int, targets: str = DEFAULT_TARGETS) -> RepairedHead:
    """PSP + LAP for one k: keep the top-k singular triplets, re-fit the tail values."""
    svd = stats.svd
    after, unexcited = singular_values_for_k(stats, k, targets)
    change = after - svd.s  # (r,) zero on the head and on unexcited directions
    delta = (svd.u * change) @ svd.v.T  # (q, l) = U diag(change) V^T
    weight = stats.weight
    repaired = (weight.detach().to(device="cpu", dtype=torch.float64) + delta.T).to(
        dtype=weight.dtype, device=weight.device
    )
    return RepairedHead(
        weight=repaired,
        k=k,
        singular_values_before=svd.s.clone(),
        singular_values_after=after,
        unexcited=unexcited,
    )


def lip_repair(
    weight: Tensor,
    bias: Tensor | None,
    features: Tensor,
    labels: Tensor,
    k: int,
    *,
    compute_dtype: torch.dtype = torch.float32,
    chunk_rows: int = 16384,
    targets: str = DEFAULT_TARGETS,
) -> tuple[RepairedHead, LapStatistics]:
    """Repair an in-memory head in one call: statistics over all samples, then PSP + LAP at k.

    With the paper's targets only the tail directions are tracked, which halves the work at k = r/2.
    """
    first = k if targets == "paper" else 0
    stats = LapStatistics(weight, bias, compute_dtype=compute_dtype, first_component=first)
    for start in range(0, features.shape[0], chunk_rows):
        stats.update(features[start : start + chunk_rows], labels[start : start + chunk_rows])
    return repair(stats, k, targets), stats


def accepted_classes(labels: Tensor, classes: int) -> Tensor:
    """(n, classes) bool: the predictions that count as right for each row.

    The class id; or, for a label matrix, any class holding the row's largest target: the labelled
    class of one-hot rows, the most likely class of soft rows, any candidate of a 0/1 candidate set
    (no class for an all-zero row).
    """
    if labels.ndim == 1:
        ids = labels.long()
        accepted = torch.zeros(ids.shape[0], classes, dtype=torch.bool, device=ids.device)
        return accepted.scatter_(1, ids[:, None], True)
    targets = labels.to(torch.float64)
    best = targets.max(dim=1, keepdim=True).values  # (n, 1)
    return (targets == best) & (best > 0)


def correct_mask(logits: Tensor, labels: Tensor) -> Tensor:
    """(n,) bool: which rows a prediction hits (`accepted_classes`); ties go to the first class."""
    accepted = accepted_classes(labels.to(logits.device), logits.shape[1])
    return accepted.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


def count_correct(logits: Tensor, labels: Tensor) -> int:
    """How many rows a prediction hits (`correct_mask`)."""
    return int(correct_mask(logits, labels).sum())


def k_grid(rank: int, most: int = 65) -> list[int]:
    """The k values to evaluate: every k up to `most` of them, else an even spread with 0 and rank."""
    if rank + 1 <= most:
        return list(range(rank + 1))
    return sorted({round(i * rank / (most - 1)) for i in range(most)})


class KCurve:
    """Accuracy after PSP + LAP for several k at once, from the projections X U of labelled rows.

    The spectra of two k differ only between them: sigma^(k) keeps s_i for i < k and takes LAP's
    fitted value from k on. So the logits at every k follow from one product at the largest k and,
    walking down the sorted k, one blocked update per step,

        logits(k_a) = logits(k_b) + Z[:, k_a:k_b] diag(fitted - s)[k_a:k_b] V[:, k_a:k_b]^T,

    which costs one more (n, r) x (r, l) product for the whole curve instead of one per k. On the
    CPU, rows go through in blocks small enough for their logits to stay in cache, shared by one
    worker thread per torch thread, each running torch on one thread (many small operations on
    several torch threads each wait on the slowest, badly so on a busy machine). On a GPU the
    blocks are large, so that kernel launches do not dominate. Ties go to the first class.
    """

    BLOCK_ELEMENTS = 2**19  # logits per block of rows on the CPU: 2 MB in float32, a core's L2
    GPU_BLOCK_ELEMENTS = 2**25  # 128 MB in float32

    def __init__(self, stats: LapStatistics, ks: list[int], targets: str = DEFAULT_TARGETS) -> None:
        if not ks:
            raise ValueError("an accuracy curve needs at least one k")
        if min(ks) < stats.first_component:
            raise ValueError(
                f"these statistics fit directions {stats.first_component}.. only; every k must be >= that"
            )
        self.ks = list(ks)
        self._stats = stats
        self._steps = sorted(set(self.ks), reverse=True)  # largest k first
        spectra_k = [singular_values_for_k(stats, k, targets)[0] for k in self._steps]  # float64
        dtype, device = stats.compute_dtype, stats.device
        self._start = spectra_k[0].to(device, dtype)  # (r,)
        change = torch.zeros_like(spectra_k[0])  # (r,) each step down changes its own columns
        for (high, low), (above, below) in zip(pairwise(self._steps), pairwise(spectra_k), strict=True):
            change[low:high] = (below - above)[low:high]
        self._change = change.to(device, dtype)
        self._v_t = stats._v_all.T.contiguous()  # (r, l)
        self._ranges = [(low, high, self._v_t[low:high]) for high, low in pairwise(self._steps)]
        bias = stats.bias
        self._bias = None if bias is None else bias.to(device, dtype)
        self._order = torch.tensor([self._steps.index(k) for k in self.ks], dtype=torch.long)
        elements = self.BLOCK_ELEMENTS if stats.device.type == "cpu" else self.GPU_BLOCK_ELEMENTS
        self.block_rows = max(1, elements // stats.num_classes)
        self.correct = [0] * len(self.ks)
        self.samples = 0

    def update(self, features: Tensor, labels: Tensor) -> None:
        self.update_projections(self._stats.full_projection(features), labels)

    def update_projections(self, projections: Tensor, labels: Tensor) -> None:
        """Add a batch given as its projections X U on every direction (`full_projection`)."""
        counts = self.row_hits(projections, labels).sum(dim=1).tolist()
        self.correct = [total + int(count) for total, count in zip(self.correct, counts, strict=True)]
        self.samples += int(projections.shape[0])

    def row_hits(self, projections: Tensor, labels: Tensor) -> Tensor:
        """(len(ks), n) bool: whether each row is predicted right at each k (in the order of `ks`)."""
        z = projections  # (n, r)
        labels = labels.to(z.device)
        hits = torch.empty(len(self._steps), z.shape[0], dtype=torch.bool, device=z.device)

        def fill(rows: slice) -> None:
            hits[:, rows] = self._block_hits(z[rows], labels[rows])

        blocks = [slice(first, first + self.block_rows) for first in range(0, z.shape[0], self.block_rows)]
        if z.device.type == "cpu" and blocks:
            workers = min(torch.get_num_threads(), len(blocks))
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                list(pool.map(fill, blocks))
        else:
            for rows in blocks:
                fill(rows)
        return hits[self._order.to(z.device)]

    def _walk(self, block: Tensor, visit: Callable[[int, Tensor], None]) -> None:
        """The logits (b, l) of a block of rows at each step, largest k first, each given to `visit`."""
        logits = (block * self._start) @ self._v_t
        if self._bias is not None:
            logits += self._bias
        visit(0, logits)
        scaled = block * self._change  # (b, r)
        for step, (low, high, v_t) in enumerate(self._ranges, start=1):
            logits.addmm_(scaled[:, low:high], v_t)
            visit(step, logits)

    def _block_hits(self, block: Tensor, labels: Tensor, argmax: bool = False) -> Tensor:
        """(steps, b) bool: `correct_mask` at each step for one block of rows, made fast.

        On the CPU, where every row accepts exactly one class, that class's logit is compared with
        the largest of the others: a max without indices, several times faster than argmax. The rows
        where the two tie (or a NaN leaves it open) are walked again with `argmax`: the first class
        of largest logit, gathered from the accepted classes.
        """
        hits = torch.empty(len(self._steps), block.shape[0], dtype=torch.bool, device=block.device)
        label = labels.long()[:, None] if labels.ndim == 1 else None  # (b, 1): the one class accepted
        if argmax or label is None or block.device.type != "cpu":
            accepted = accepted_classes(labels, self._v_t.shape[1])  # (b, l)
            if argmax or block.device.type != "cpu" or not bool((accepted.sum(dim=1) == 1).all()):

                def first_max(step: int, logits: Tensor) -> None:
                    hits[step] = accepted.gather(1, torch.max(logits, dim=1).indices[:, None]).squeeze(1)

                self._walk(block, first_max)
                return hits
            label = accepted.nonzero()[:, 1:]
        margins = torch.empty(len(self._steps), block.shape[0], 1, dtype=block.dtype, device=block.device)

        def margin(step: int, logits: Tensor) -> None:
            own = logits.gather(1, label)  # (b, 1)
            logits.scatter_(1, label, -torch.inf)
            torch.sub(own, logits.amax(dim=1, keepdim=True), out=margins[step])
            logits.scatter_(1, label, own)

        self._walk(block, margin)
        margins = margins.squeeze(2)
        torch.gt(margins, 0, out=hits)
        open_rows = (~(hits | (margins < 0))).any(dim=0).nonzero().squeeze(1)  # ties, NaN
        if open_rows.numel():
            hits[:, open_rows] = self._block_hits(block[open_rows], labels[open_rows], argmax=True)
        return hits

    def accuracies(self) -> list[float]:
        return [count / max(self.samples, 1) for count in self.correct]
