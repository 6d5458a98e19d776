"""Statistics of singular spectra and of subspaces: what label noise does to a classifier."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def singular_values(matrix: Tensor) -> Tensor:
    """All min(rows, cols) singular values of a 2-D tensor, in float64, descending."""
    return torch.linalg.svdvals(matrix.detach().to(device="cpu", dtype=torch.float64))


def numerical_rank(values: Tensor, shape: tuple[int, int]) -> int:
    """How many singular values stand above rounding (numpy's matrix_rank tolerance)."""
    if values.numel() == 0 or float(values[0]) == 0.0:
        return 0
    tolerance = max(shape) * torch.finfo(torch.float64).eps * float(values[0])
    return int((values > tolerance).sum())


def energy(values: Tensor) -> Tensor:
    """Cumulative energy: entry i is the share of ||W||_F^2 held by the top i+1 components."""
    squares = values.to(torch.float64) ** 2
    total = squares.sum()
    if total == 0:
        return torch.zeros_like(squares)
    return torch.cumsum(squares, 0) / total


def energy_kept(values: Tensor, k: int) -> float:
    """Share of ||W||_F^2 held by the top k singular values."""
    return 0.0 if k == 0 else float(energy(values)[k - 1])


def k_for_energy(values: Tensor, fraction: float) -> int:
    """The smallest k whose top-k components hold at least `fraction` of the energy."""
    cumulative = energy(values)
    if cumulative.numel() == 0 or float(cumulative[-1]) == 0.0:
        return 0
    return int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=torch.float64))) + 1


def effective_rank(values: Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli, 2007)."""
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(values: Tensor) -> float:
    """||W||_F^2 / ||W||_2^2: a rank that small singular values barely move."""
    if values.numel() == 0 or values[0] == 0:
        return 0.0
    return float(((values / values[0]) ** 2).sum())  # scaled first: squares of 1e-170 underflow to 0


def top_energy_share(values: Tensor, fraction: float = 0.1) -> float:
    """Share of the energy in the top `fraction` of the components (at least one)."""
    if values.numel() == 0:
        return 0.0
    return energy_kept(values, max(1, math.ceil(fraction * values.numel())))


def right_singular_vectors(weight: Tensor) -> Tensor:
    """V of W = weight.T = U S V^T, columns ordered by singular value: (l, min(q, l))."""
    w = weight.detach().to(device="cpu", dtype=torch.float64).T  # (q, l)
    return torch.linalg.svd(w, full_matrices=False).Vh.T


def subspace_similarity(v_a: Tensor, v_b: Tensor, i: int, j: int) -> float:
    """phi(V, V', i, j) = ||V_{:i}^T V'_{:j}||_F^2 / min(i, j), in [0, 1] (the paper's measure)."""
    if i < 1 or j < 1:
        raise ValueError("i and j must be at least 1")
    overlap = v_a[:, :i].T @ v_b[:, :j]
    return float((overlap**2).sum() / min(i, j))


def subspace_similarity_matrix(v_a: Tensor, v_b: Tensor) -> Tensor:
    """phi(V, V', i, j) for every i, j at once: entry [i-1, j-1], from 2-D cumulative sums."""
    squared = (v_a.T @ v_b) ** 2  # (r_a, r_b)
    cumulative = squared.cumsum(0).cumsum(1)
    i = torch.arange(1, v_a.shape[1] + 1, dtype=squared.dtype)[:, None]
    j = torch.arange(1, v_b.shape[1] + 1, dtype=squared.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def principal_angles(v_a: Tensor, v_b: Tensor, k: int) -> Tensor:
    """Principal angles (radians, ascending) between the spans of the first k columns of each."""
    cosines = torch.linalg.svdvals(v_a[:, :k].T @ v_b[:, :k]).clamp(-1.0, 1.0)
    return torch.arccos(cosines)


SAME_VECTOR_SINE = 1e-3  # a float32 repair's vectors move ~1e-5 on the demo; unrelated heads' by > 0.1


@dataclass(frozen=True)
class VectorMatch:
    """B's right singular vectors matched one to one with A's, up to sign (see `match_vectors`)."""

    order: list[int]  # order[i]: B's component (0-based, by rank) that holds A's i-th vector
    sines: list[float]  # sine of the angle between A's i-th vector and its match

    @property
    def reordered(self) -> bool:
        """Whether B ranks the shared vectors in another order than A (re-fitted values re-sort)."""
        return self.order != list(range(len(self.order)))

    def values_by_vector(self, values_b: Sequence[float]) -> list[float]:
        """B's singular values in A's order: entry i is B's value on A's i-th vector."""
        return [float(values_b[j]) for j in self.order]


def match_vectors(v_a: Tensor, v_b: Tensor, tolerance: float = SAME_VECTOR_SINE) -> VectorMatch | None:
    """Whether B holds A's right singular vectors, up to sign and order, and in which order.

    A head that `lip repair` re-fitted (LAP keeps U and V, changes the tail's values) has them, but
    ranks them by its new values, so phi and the principal angles by rank compare different
    vectors. Each of A's vectors is matched with B's closest by |cosine|; None unless every sine is
    at most `tolerance` (below 1/sqrt(2), two of A's orthonormal vectors cannot share a match).
    """
    if v_a.shape != v_b.shape or v_a.shape[1] == 0:
        return None
    cosines = (v_a.T.to(torch.float64) @ v_b.to(torch.float64)).abs()
    best = cosines.max(dim=1)
    order = [int(index) for index in best.indices]  # one to one once every sine is small: V is orthonormal
    sines = (1.0 - best.values.clamp(max=1.0) ** 2).clamp(min=0.0).sqrt()
    if bool((sines > tolerance).any()):
        return None
    return VectorMatch(order, [float(sine) for sine in sines])
