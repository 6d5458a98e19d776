"""The gate's pure parts: thresholds parsed and judged, the paired accuracy test (the exact test and
interval lip already has, its power), same-vector matching of a repaired head against float64
references (hypothesis), and baseline files read back and refused when damaged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lip_cli import baseline, gate, power, selection, spectra
from lip_cli.errors import LipError

# thresholds


@pytest.mark.parametrize(
    ("text", "direction", "expected"),
    [
        ("phi@5=0.9", "below", gate.Threshold("phi", 5, 0.9, "below")),
        ("ANGLE@3=30", "above", gate.Threshold("angle", 3, 30.0, "above")),
        ("effective-rank=-10%", "below", gate.Threshold("effective-rank", None, -10.0, "below", True)),
        ("energy@2=0.05", "above", gate.Threshold("energy", 2, 0.05, "above")),
        ("accuracy=-0.01", "below", gate.Threshold("accuracy", None, -0.01, "below")),
    ],
)
def test_thresholds_parse(text: str, direction: str, expected: gate.Threshold) -> None:
    assert gate.parse_threshold(text, direction) == expected


@pytest.mark.parametrize(
    "text", ["phi@0=0.5", "phi@5=nan", "angle@5=inf", "energy=0.1", "accuracy@3=-0.1", "phi@5=0.9=1", ""]
)
def test_bad_thresholds_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        gate.parse_threshold(text, "below")


def test_a_threshold_fails_strictly_beyond_its_value() -> None:
    floor = gate.parse_threshold("phi@5=0.9", "below")
    ceiling = gate.parse_threshold("angle@5=30", "above")
    assert gate.judge(floor, "b", 0.9).passed and not gate.judge(floor, "b", 0.8999).passed
    assert gate.judge(ceiling, "b", 30.0).passed and not gate.judge(ceiling, "b", 30.01).passed
    assert not gate.judge(floor, "b", math.nan).passed
    assert gate.change(9.0, 8.1, relative=True) == pytest.approx(-10.0)
    assert gate.change(9.0, 8.1, relative=False) == pytest.approx(-0.9)


# the accuracy test


def test_the_accuracy_test_is_the_exact_test_lip_has() -> None:
    counts = selection.PairedCounts(both=900, gains=10, losses=40, neither=50)
    test = gate.accuracy_test(counts, alpha=0.05, margin=-0.01)
    assert test.p_value_drop == selection.mcnemar_p_value(40, 10)
    assert test.interval == selection.change_bounds(counts, 0.05)
    assert test.detectable == (power.power(1000, 0.05, 0.01, 0.05) >= power.LEVEL)
    threshold = gate.parse_threshold("accuracy=-0.01", "below")
    assert gate.judge_accuracy(threshold, "b", test).verdict == gate.FAILED  # -3 pt, p ~ 1e-5
    lenient = gate.parse_threshold("accuracy=-0.05", "below")  # significant, but within the margin
    assert gate.judge_accuracy(lenient, "b", gate.accuracy_test(counts, 0.05, -0.05)).verdict != gate.FAILED


@given(rows=st.integers(1, 3000), discordant=st.integers(0, 60))
@settings(max_examples=40, deadline=None)
def test_too_few_rows_is_what_the_power_says(rows: int, discordant: int) -> None:
    """Concordant heads never fail; they pass exactly when the rows could see a one-point drop."""
    discordant = min(discordant, rows)
    counts = selection.PairedCounts(
        both=rows - discordant, gains=discordant // 2, losses=discordant - discordant // 2
    )
    check = gate.judge_accuracy(
        gate.parse_threshold("accuracy=0", "below"), "b", gate.accuracy_test(counts, 0.05, 0.0)
    )
    if check.verdict != gate.FAILED:
        discordance = max(discordant / rows, 0.01)
        enough = power.power(rows, min(discordance, 1.0), 0.01, 0.05) >= power.LEVEL
        assert check.verdict == (gate.PASSED if enough else gate.TOO_FEW)
    assert gate.verdict([check]) == check.verdict


# same vectors, up to sign and order


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q


@given(l=st.integers(2, 12), extra=st.integers(0, 6), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_a_refit_of_the_values_is_matched_by_vector(l: int, extra: int, seed: int) -> None:
    """W' = U diag(s') V^T with new values in another order (a LAP re-fit, signs flipped by
    negative values): every one of A's vectors is found in B, at B's rank of its new value, and B's
    value on it is |s'_i| (float64 reference)."""
    generator = torch.Generator().manual_seed(seed)
    q = l + extra
    u = _orthogonal(q, generator)[:, :l]
    v = _orthogonal(l, generator)
    s = torch.sort(torch.rand(l, generator=generator, dtype=torch.float64) + 0.5, descending=True).values
    refit = s.clone()
    refit[l // 2 :] = (torch.rand(l - l // 2, generator=generator, dtype=torch.float64) + 0.1) * torch.where(
        torch.rand(l - l // 2, generator=generator) < 0.3, -1.0, 1.0
    ).to(torch.float64)
    gaps = torch.sort(refit.abs()).values.diff()
    if bool((gaps < 1e-3).any()):  # values too close: their vectors are not determined one by one
        return
    weight_a, weight_b = ((u @ torch.diag(values) @ v.T).T for values in (s, refit))
    v_a, v_b = spectra.right_singular_vectors(weight_a), spectra.right_singular_vectors(weight_b)
    match = spectra.match_vectors(v_a, v_b)
    assert match is not None
    ranks = torch.argsort(refit.abs(), descending=True).tolist()
    assert match.order == [ranks.index(i) for i in range(l)]
    values_b = spectra.singular_values(weight_b).tolist()
    assert match.values_by_vector(values_b) == pytest.approx(refit.abs().tolist(), rel=1e-9)
    assert max(match.sines) < 1e-6


@given(l=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_unrelated_heads_do_not_match(l: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    v_a, rotation = _orthogonal(l, generator), _orthogonal(l, generator)
    v_b = v_a @ rotation
    cosines = (v_a.T @ v_b).abs()
    expected = bool(
        (cosines.max(dim=1).values >= math.sqrt(1 - 1e-6)).all()
    )  # rotation ~ a signed permutation
    assert (spectra.match_vectors(v_a, v_b) is not None) == expected


def test_the_demo_repair_by_vector() -> None:
    """A head whose tail values were shrunk after k = 3 (what LAP did on the demo): by rank, phi(5, 5)
    falls and the angle at 5 is 90 degrees; by vector every one of A's vectors is there."""
    generator = torch.Generator().manual_seed(3)
    u, v = _orthogonal(32, generator)[:, :10], _orthogonal(10, generator)
    s = torch.linspace(3.0, 1.0, 10, dtype=torch.float64)
    refit = torch.cat(
        [s[:3], torch.tensor([0.07, 0.09, 0.08, 0.085, 0.095, 0.06, 0.03], dtype=torch.float64)]
    )
    weight_a, weight_b = ((u @ torch.diag(values) @ v.T).T.to(torch.float32) for values in (s, refit))
    v_a, v_b = spectra.right_singular_vectors(weight_a), spectra.right_singular_vectors(weight_b)
    assert spectra.principal_angles(v_a, v_b, 5)[-1].rad2deg() > 89.9
    match = spectra.match_vectors(v_a, v_b)
    assert match is not None and match.reordered and match.order[:3] == [0, 1, 2]
    assert max(match.sines) < spectra.SAME_VECTOR_SINE


# baseline files


def test_a_baseline_round_trips(tmp_path) -> None:
    weight = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    record = baseline.from_weight(weight, "fc", "float32", {"source": "m.pt", "source_sha256": "ab"})
    path = tmp_path / "any-name.bin"
    baseline.write_baseline(record, path)
    assert baseline.is_baseline(path)
    read = baseline.read_baseline(path)
    assert torch.equal(read.singular_values, spectra.singular_values(weight))
    assert torch.equal(read.vectors, spectra.right_singular_vectors(weight))
    assert (read.layer, read.shape, read.provenance["source_sha256"]) == ("fc", (10, 32), "ab")
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert not baseline.is_baseline(tmp_path / "x.npy")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"vectors": torch.ones(10, 10, dtype=torch.float64)}, "not orthonormal"),
        ({"values": torch.arange(10, dtype=torch.float64)}, "descending"),
        ({"values": torch.full((10,), math.nan, dtype=torch.float64)}, "NaN"),
        ({"vectors": torch.eye(10)}, "float64"),
        ({"record": {"layer": "fc", "version": 1, "shape": [9, 32]}}, "shapes"),
        ({"record": {"layer": "fc", "version": 9, "shape": [10, 32]}}, "version"),
        ({"record": [1]}, "names no layer"),
    ],
)
def test_a_damaged_baseline_is_one_line(tmp_path, change: dict, says: str) -> None:
    weight = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    parts = {
        "values": spectra.singular_values(weight),
        "vectors": spectra.right_singular_vectors(weight),
        "record": {"layer": "fc", "version": 1, "shape": [10, 32], "dtype": "float32"},
        **change,
    }
    path = tmp_path / "b.safetensors"
    tensors = {baseline.VALUES: parts["values"], baseline.VECTORS: parts["vectors"]}
    save_file(tensors, str(path), metadata={baseline.MARKER: json.dumps(parts["record"])})
    assert baseline.is_baseline(path)
    with pytest.raises(LipError, match=says):
        baseline.read_baseline(path)
