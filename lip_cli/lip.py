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
from dataclasses import dataclass

import torch
from torch import Tensor

from lip_cli.spectra import numerical_rank

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


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
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rank = numerical_rank(s, tuple(w.shape))
    return HeadSVD(u=u[:, :rank].contiguous(), s=s[:rank].clone(), v=vh[:rank].T.contiguous())


def label_targets(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Y as an (n, l) matrix: integer class ids become one-hot rows; matrices pass through."""
    if labels.ndim == 1:
        return torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)
    return labels.to(dtype)


class LapStatistics:
    """Per-component sums over samples that LAP needs, for every singular direction of a head.

    For direction i: numerator_i = sum_n (x_n . u_i)((y_n - b) . v_i) and
    denominator_i = sum_n (x_n . u_i)^2. Feed batches with `update`, combine partial sums with
    `merge` (or `all_reduce` under torch.distributed), then call `repair(stats, k)` for any k.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        compute_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.svd = head_svd(weight)
        self.compute_dtype = compute_dtype
        self.device = torch.device(device) if device is not None else weight.device
        num_classes = weight.shape[0]
        bias64 = (
            torch.zeros(num_classes, dtype=torch.float64)
            if bias is None
            else bias.detach().to(device="cpu", dtype=torch.float64)
        )
        self._u = self.svd.u.to(self.device, compute_dtype)  # (q, r)
        self._v = self.svd.v.to(self.device, compute_dtype)  # (l, r)
        self._bias_v = (bias64 @ self.svd.v).to(self.device, compute_dtype)  # (r,)
        self.numerator = torch.zeros(self.svd.rank, dtype=torch.float64, device=self.device)
        self.denominator = torch.zeros(self.svd.rank, dtype=torch.float64, device=self.device)
        self.samples = 0

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add one batch: features (n, q); labels (n,) class ids or (n, l) targets."""
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels in this batch")
        self.accumulate(self.project(features), labels)

    def project(self, features: Tensor) -> Tensor:
        """X U for a batch, (n, r) in the compute dtype: the one product LAP needs."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must be (n, {self.in_features}), got {tuple(features.shape)}")
        return features.to(self.device, self.compute_dtype) @ self._u

    def accumulate(self, projections: Tensor, labels: Tensor) -> None:
        """Add a batch given as its projections X U (from `project`) and its labels."""
        z = projections  # (n, r)
        labels = labels.to(self.device)
        if labels.ndim == 1:
            # sum_n z_n (v_{y_n} - V^T b) = sum_c v_c * (sum of z over class c) - (V^T b) * sum_n z_n
            class_sums = torch.zeros(self.num_classes, z.shape[1], dtype=z.dtype, device=z.device)
            class_sums.index_add_(0, labels.long(), z)  # (l, r)
            numerator = (class_sums * self._v).sum(0) - self._bias_v * class_sums.sum(0)
        else:
            t = labels.to(self.compute_dtype) @ self._v - self._bias_v  # (n, r)
            numerator = (z * t).sum(0)
        self.numerator += numerator.to(torch.float64)  # chunk sums in the compute dtype
        self.denominator += (z * z).sum(0).to(torch.float64)
        self.samples += int(z.shape[0])

    def copy(self) -> LapStatistics:
        """An independent accumulator with the same head and the same sums so far."""
        twin = copy.copy(self)
        twin.numerator, twin.denominator = self.numerator.clone(), self.denominator.clone()
        return twin

    def merge(self, other: LapStatistics) -> None:
        """Add the sums of another accumulator built on the same head."""
        if other.svd.rank != self.svd.rank or not torch.equal(other.weight, self.weight):
            raise ValueError("cannot merge statistics of different heads")
        self.numerator += other.numerator.to(self.device)
        self.denominator += other.denominator.to(self.device)
        self.samples += other.samples

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the statistics over all processes of a torch.distributed group, in place."""
        import torch.distributed as dist

        samples = torch.tensor([float(self.samples)], dtype=torch.float64, device=self.device)
        packed = torch.cat([self.numerator, self.denominator, samples])
        dist.all_reduce(packed, group=group)
        rank = self.svd.rank
        self.numerator = packed[:rank].clone()
        self.denominator = packed[rank : 2 * rank].clone()
        self.samples = int(packed[-1].item())

    def fitted_singular_values(self) -> tuple[Tensor, Tensor]:
        """LAP's closed-form sigma for every direction, and a mask of the directions excited.

        A direction the features never excite (||X u_i|| = 0 to rounding) has no least-squares
        fit; it keeps its old value there.
        """
        scale = self.denominator.max() if self.denominator.numel() else torch.tensor(0.0)
        excited = self.denominator > max(float(scale), 1e-300) * 1e-12
        safe_denominator = torch.where(excited, self.denominator, 1.0)
        fitted = torch.where(excited, self.numerator / safe_denominator, self.svd.s.to(self.device))
        return fitted.cpu(), excited.cpu()


@dataclass(frozen=True)
class RepairedHead:
    """A repaired classifier weight (torch layout, original dtype) and its spectrum change."""

    weight: Tensor  # (l, q)
    k: int
    singular_values_before: Tensor  # (r,) float64
    singular_values_after: Tensor  # (r,) float64
    unexcited: tuple[int, ...]  # tail directions kept as they were: the features never excite them


def singular_values_for_k(stats: LapStatistics, k: int) -> tuple[Tensor, tuple[int, ...]]:
    """The spectrum after PSP (top k kept) + LAP (tail re-fitted), and the tail left unfitted."""
    rank = stats.svd.rank
    if not 0 <= k <= rank:
        raise ValueError(f"k must be between 0 and the rank {rank}, got {k}")
    fitted, excited = stats.fitted_singular_values()
    after = stats.svd.s.clone()
    after[k:] = fitted[k:]
    unexcited = tuple(int(i) for i in torch.nonzero(~excited[k:]).flatten() + k)
    return after, unexcited


def repair(stats: LapStatistics, k: int) -> RepairedHead:
    """PSP + LAP for one k: keep the top-k singular triplets, re-fit the tail values."""
    svd = stats.svd
    after, unexcited = singular_values_for_k(stats, k)
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
    compute_dtype: torch.dtype = torch.float64,
    chunk_rows: int = 16384,
) -> tuple[RepairedHead, LapStatistics]:
    """Repair an in-memory head in one call: statistics over all samples, then PSP + LAP at k."""
    stats = LapStatistics(weight, bias, compute_dtype=compute_dtype)
    for start in range(0, features.shape[0], chunk_rows):
        stats.update(features[start : start + chunk_rows], labels[start : start + chunk_rows])
    return repair(stats, k), stats


def count_correct(logits: Tensor, labels: Tensor) -> int:
    """Predictions that hit a label: the class id, or any class holding the row's largest target.

    With one-hot rows that is the labelled class, with soft rows the most likely class, and with a
    0/1 candidate-set matrix (partial labels) any candidate.
    """
    predicted = logits.argmax(dim=1)
    if labels.ndim == 1:
        return int((predicted == labels.to(predicted.device).long()).sum())
    targets = labels.to(logits.device, torch.float64)
    best = targets.max(dim=1).values
    hit = targets.gather(1, predicted[:, None]).squeeze(1)
    return int(((hit == best) & (best > 0)).sum())


def k_grid(rank: int, most: int = 65) -> list[int]:
    """The k values to evaluate: every k up to `most` of them, else an even spread with 0 and rank."""
    if rank + 1 <= most:
        return list(range(rank + 1))
    return sorted({round(i * rank / (most - 1)) for i in range(most)})


class KCurve:
    """Accuracy after PSP + LAP for several k at once, from one more pass over labelled features.

    Logits for k are X U diag(sigma^(k)) V^T + b, so each batch pays for X U once and a small
    (n, r) x (r, l) product per k.
    """

    def __init__(self, stats: LapStatistics, ks: list[int]) -> None:
        self.ks = list(ks)
        self._stats = stats
        spectra_k = [singular_values_for_k(stats, k)[0] for k in self.ks]
        self._sigmas = torch.stack(spectra_k).to(stats.device, stats.compute_dtype)  # (len(ks), r)
        bias = stats.bias
        self._bias = None if bias is None else bias.to(stats.device, stats.compute_dtype)
        self.correct = [0] * len(self.ks)
        self.samples = 0

    def update(self, features: Tensor, labels: Tensor) -> None:
        self.update_projections(self._stats.project(features), labels)

    def update_projections(self, projections: Tensor, labels: Tensor) -> None:
        """Add a batch given as its projections X U (from `LapStatistics.project`)."""
        stats = self._stats
        for index in range(len(self.ks)):
            out = (projections * self._sigmas[index]) @ stats._v.T  # (n, l)
            if self._bias is not None:
                out = out + self._bias
            self.correct[index] += count_correct(out, labels)
        self.samples += int(projections.shape[0])

    def accuracies(self) -> list[float]:
        return [count / max(self.samples, 1) for count in self.correct]
