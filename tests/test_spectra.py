"""Spectrum statistics on known matrices, and the subspace measures of the paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lip_cli import spectra


def test_identity() -> None:
    values = spectra.singular_values(torch.eye(6))
    assert spectra.numerical_rank(values, (6, 6)) == 6
    assert spectra.effective_rank(values) == pytest.approx(6.0)
    assert spectra.stable_rank(values) == pytest.approx(6.0)
    assert spectra.energy_kept(values, 3) == pytest.approx(0.5)
    assert spectra.k_for_energy(values, 0.5) == 3
    assert spectra.top_energy_share(values) == pytest.approx(1 / 6)


def test_rank_one() -> None:
    matrix = torch.outer(torch.arange(1.0, 5.0), torch.tensor([1.0, -2.0, 0.5]))
    values = spectra.singular_values(matrix)
    assert spectra.numerical_rank(values, (4, 3)) == 1
    assert spectra.effective_rank(values) == pytest.approx(1.0)
    assert spectra.stable_rank(values) == pytest.approx(1.0)
    assert spectra.k_for_energy(values, 0.99) == 1


def test_diagonal_against_numpy() -> None:
    diagonal = np.array([5.0, 3.0, 2.0, 0.5])
    matrix = np.zeros((4, 7))
    matrix[range(4), range(4)] = diagonal
    values = spectra.singular_values(torch.from_numpy(matrix))
    np.testing.assert_allclose(values.numpy(), diagonal)
    p = diagonal / diagonal.sum()
    assert spectra.effective_rank(values) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert spectra.stable_rank(values) == pytest.approx((diagonal**2).sum() / 25.0)
    cumulative = np.cumsum(diagonal**2) / (diagonal**2).sum()
    np.testing.assert_allclose(spectra.energy(values).numpy(), cumulative)
    assert spectra.k_for_energy(values, 0.95) == int(np.searchsorted(cumulative, 0.95) + 1)
    assert spectra.numerical_rank(values, (4, 7)) == np.linalg.matrix_rank(matrix)


def test_zero_matrix() -> None:
    values = spectra.singular_values(torch.zeros(3, 4))
    assert spectra.numerical_rank(values, (3, 4)) == 0
    assert spectra.effective_rank(values) == 0.0 and spectra.stable_rank(values) == 0.0
    assert spectra.k_for_energy(values, 0.9) == 0


def random_orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def test_phi_identical_and_orthogonal() -> None:
    basis = random_orthonormal(10, 10, 0)
    v, v_orthogonal = basis[:, :4], basis[:, 4:8]
    for i in range(1, 5):
        for j in range(1, 5):
            assert spectra.subspace_similarity(v, v, max(i, j), max(i, j)) == pytest.approx(1.0)
            assert spectra.subspace_similarity(v, v_orthogonal, i, j) == pytest.approx(0.0, abs=1e-12)
    assert spectra.subspace_similarity(v, v, 2, 4) == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), i=st.integers(1, 6), j=st.integers(1, 6))
def test_phi_is_symmetric_bounded_and_matches_the_matrix(seed: int, i: int, j: int) -> None:
    v_a, v_b = random_orthonormal(8, 6, seed), random_orthonormal(8, 6, seed + 1)
    phi = spectra.subspace_similarity(v_a, v_b, i, j)
    assert 0.0 <= phi <= 1.0 + 1e-12
    assert phi == pytest.approx(spectra.subspace_similarity(v_b, v_a, j, i))
    matrix = spectra.subspace_similarity_matrix(v_a, v_b)
    assert float(matrix[i - 1, j - 1]) == pytest.approx(phi)


def test_principal_angles_of_a_known_rotation() -> None:
    theta = 0.3
    e = torch.eye(3, dtype=torch.float64)
    v_a = e[:, :2]
    v_b = torch.stack([e[:, 0], math.cos(theta) * e[:, 1] + math.sin(theta) * e[:, 2]], dim=1)
    angles = spectra.principal_angles(v_a, v_b, 2)
    torch.testing.assert_close(angles, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-7, rtol=0)
    assert spectra.subspace_similarity(v_a, v_b, 2, 2) == pytest.approx((1 + math.cos(theta) ** 2) / 2)
