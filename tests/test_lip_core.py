"""The core: PSP + LAP against an independent float64 computation, and its algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_head
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import least_squares_tail, logit_scale_lip, paper_lip

from lip_cli import LapStatistics, count_correct, head_svd, lip_repair, repair
from lip_cli.lip import KCurve


def label_variants(labels: torch.Tensor, classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    one_hot = torch.nn.functional.one_hot(labels, classes).to(torch.float32)
    soft = torch.softmax(torch.randn(labels.shape[0], classes, generator=generator, dtype=torch.float64), 1)
    return {"int": labels, "one-hot": one_hot, "soft": soft}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# the default compute (float32 products, float64 sums) and float64 compute, with the relative error
# each must stay within against the float64 reference
COMPUTE = pytest.mark.parametrize(
    "compute, tolerance", [({}, 2e-6), ({"compute_dtype": torch.float64}, 1e-11)], ids=["default", "float64"]
)


def test_the_default_compute_is_float32_products() -> None:
    head = make_head(n=10, q=4, l=3)
    assert LapStatistics(head.weight, head.bias).compute_dtype == torch.float32


@pytest.mark.parametrize("q, l", [(12, 5), (5, 9)], ids=["q>l", "q<l"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", ["int", "one-hot", "soft"])
@COMPUTE
def test_repair_matches_the_papers_dense_formula(
    q: int, l: int, with_bias: bool, kind: str, compute: dict, tolerance: float
) -> None:
    head = make_head(n=400, q=q, l=l, seed=q * 10 + l, bias=with_bias)
    labels = label_variants(head.labels, l)[kind]
    rank = min(q, l)
    for k in (0, 1, rank // 2, rank - 1):
        repaired, _ = lip_repair(
            head.weight, head.bias, head.features, labels, k, chunk_rows=97, targets="paper", **compute
        )
        expected = paper_lip(
            head.weight.numpy(),
            None if head.bias is None else head.bias.numpy(),
            head.features.numpy(),
            labels.numpy(),
            k,
        )
        assert relative_error(repaired.weight.numpy(), expected) < tolerance, (kind, k)


def test_float32_compute_stays_close_to_float64() -> None:
    head = make_head(n=2000, q=32, l=10, seed=3)
    exact, _ = lip_repair(head.weight, head.bias, head.features, head.labels, 4, compute_dtype=torch.float64)
    fast, _ = lip_repair(head.weight, head.bias, head.features, head.labels, 4, compute_dtype=torch.float32)
    assert relative_error(fast.weight.numpy(), exact.weight.numpy()) < 1e-5


def test_rank_deficient_weight_uses_its_numerical_rank() -> None:
    head = make_head(n=300, q=10, l=6, seed=4)
    low_rank = head.weight[:, :3] @ torch.randn(3, 10, dtype=torch.float64)  # rank 3
    stats = LapStatistics(low_rank, head.bias)
    assert stats.svd.rank == 3
    stats.update(head.features, head.labels)
    assert torch.equal(repair(stats, 3).weight, low_rank)
    with pytest.raises(ValueError, match="rank 3"):
        repair(stats, 4)


def test_unexcited_directions_keep_their_value() -> None:
    head = make_head(n=200, q=8, l=4, seed=5)
    svd = head_svd(head.weight)
    # features orthogonal to the last right... left singular vector u_4: that direction is never excited
    u_last = svd.u[:, -1]
    features = head.features - (head.features @ u_last)[:, None] * u_last[None, :]
    repaired, _ = lip_repair(head.weight, head.bias, features, head.labels, 1)
    assert repaired.unexcited == (3,)
    assert repaired.singular_values_after[3] == svd.s[3]
    assert repaired.singular_values_after[1] != svd.s[1]


def test_statistics_merge_equals_one_pass() -> None:
    head = make_head(n=500, q=16, l=7, seed=6)
    exact = {"compute_dtype": torch.float64}
    whole = LapStatistics(head.weight, head.bias, **exact)
    whole.update(head.features, head.labels)
    first, second = (
        LapStatistics(head.weight, head.bias, **exact),
        LapStatistics(head.weight, head.bias, **exact),
    )
    first.update(head.features[:123], head.labels[:123])
    second.update(head.features[123:], head.labels[123:])
    first.merge(second)
    assert first.samples == whole.samples == 500
    torch.testing.assert_close(first.numerator, whole.numerator, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.denominator, whole.denominator, rtol=1e-12, atol=1e-12)
    other = make_head(n=10, q=16, l=7, seed=7)
    with pytest.raises(ValueError, match="different heads"):
        first.merge(LapStatistics(other.weight, other.bias, **exact))


def test_update_rejects_mismatched_batches(head) -> None:
    stats = LapStatistics(head.weight, head.bias)
    with pytest.raises(ValueError, match="features must be"):
        stats.update(head.features[:, :3], head.labels)
    with pytest.raises(ValueError, match="labels in this batch"):
        stats.update(head.features, head.labels[:5])


def test_count_correct_for_each_label_kind() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 5.0]])  # predicts 0, 1, 2
    assert count_correct(logits, torch.tensor([0, 2, 2])) == 2
    one_hot = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1]])
    assert count_correct(logits, one_hot) == 2
    candidates = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 0]])  # last row: empty candidate set
    assert count_correct(logits, candidates) == 2
    soft = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6]])
    assert count_correct(logits, soft) == 2


dims = st.integers(min_value=1, max_value=9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=dims, l=dims, seed=st.integers(0, 10_000), with_bias=st.booleans())
def test_k_equal_to_rank_changes_nothing(q: int, l: int, seed: int, with_bias: bool) -> None:
    head = make_head(n=30, q=q, l=l, seed=seed, bias=with_bias)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        weight = head.weight.to(dtype)
        stats = LapStatistics(weight, head.bias)
        stats.update(head.features, head.labels)
        repaired = repair(stats, stats.svd.rank)
        assert repaired.weight.dtype == dtype
        assert torch.equal(repaired.weight, weight)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=st.integers(2, 9), l=st.integers(2, 9), seed=st.integers(0, 10_000), data=st.data())
def test_lap_is_the_least_squares_optimum_over_the_tail(q: int, l: int, seed: int, data) -> None:
    head = make_head(n=60, q=q, l=l, seed=seed, bias=data.draw(st.booleans()))
    k = data.draw(st.integers(0, min(q, l) - 1))
    repaired, stats = lip_repair(
        head.weight, head.bias, head.features, head.labels, k, compute_dtype=torch.float64, targets="paper"
    )
    bias = None if head.bias is None else head.bias.numpy()
    expected = least_squares_tail(head.weight.numpy(), bias, head.features.numpy(), head.labels.numpy(), k)
    fitted = repaired.singular_values_after[k : stats.svd.rank].numpy()
    np.testing.assert_allclose(fitted, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(repaired.singular_values_after[:k], stats.svd.s[:k])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 80), chunk=st.integers(1, 90), seed=st.integers(0, 10_000))
def test_chunked_and_one_shot_statistics_agree(n: int, chunk: int, seed: int) -> None:
    head = make_head(n=n, q=6, l=4, seed=seed)
    one_shot = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64)
    one_shot.update(head.features, head.labels)
    _, chunked = lip_repair(
        head.weight, head.bias, head.features, head.labels, 0, chunk_rows=chunk, compute_dtype=torch.float64
    )
    torch.testing.assert_close(chunked.numerator, one_shot.numerator, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunked.denominator, one_shot.denominator, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(q=dims, l=dims, seed=st.integers(0, 10_000), data=st.data())
def test_shapes_and_dtypes_are_kept(q: int, l: int, seed: int, data) -> None:
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    head = make_head(n=25, q=q, l=l, seed=seed)
    weight = head.weight.to(dtype)
    k = data.draw(st.integers(0, head_svd(weight).rank))
    repaired, stats = lip_repair(weight, head.bias.to(dtype), head.features.to(dtype), head.labels, k)
    assert repaired.weight.shape == (l, q) and repaired.weight.dtype == dtype
    assert repaired.singular_values_before.shape == repaired.singular_values_after.shape == (stats.svd.rank,)


def test_tracking_only_the_tail_gives_the_same_repair() -> None:
    head = make_head(n=300, q=12, l=8, seed=8)
    full = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64)
    full.update(head.features, head.labels)
    tail = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64, first_component=3)
    tail.update(head.features, head.labels)
    torch.testing.assert_close(tail.numerator, full.numerator[3:], rtol=1e-12, atol=1e-12)
    for k in (3, 5, 8):
        assert torch.equal(repair(tail, k, "paper").weight, repair(full, k, "paper").weight)
    with pytest.raises(ValueError, match="k must be >= that"):
        repair(tail, 2, "paper")
    with pytest.raises(ValueError, match="every k must be >= that"):
        KCurve(tail, [2, 5], "paper")
    with pytest.raises(ValueError, match="different heads"):
        full.merge(tail)


@pytest.mark.parametrize("kind", ["int", "one-hot", "soft"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@COMPUTE
def test_logit_scale_targets_match_the_dense_formula(
    kind: str, with_bias: bool, compute: dict, tolerance: float
) -> None:
    head = make_head(n=300, q=12, l=6, seed=41, bias=with_bias)
    labels = label_variants(head.labels, 6)[kind]
    bias = None if head.bias is None else head.bias.numpy()
    for k in (0, 2, 5):
        repaired, _ = lip_repair(
            head.weight, head.bias, head.features, labels, k, targets="logit-scale", chunk_rows=71, **compute
        )
        expected = logit_scale_lip(head.weight.numpy(), bias, head.features.numpy(), labels.numpy(), k)
        assert relative_error(repaired.weight.numpy(), expected) < tolerance, (kind, k)


def test_logit_scale_needs_every_direction_and_known_targets() -> None:
    head = make_head(n=50, q=6, l=4, seed=42)
    tail = LapStatistics(head.weight, head.bias, first_component=2)
    tail.update(head.features, head.labels)
    with pytest.raises(ValueError, match="every direction"):
        repair(tail, 2, targets="logit-scale")
    with pytest.raises(ValueError, match="targets must be one of"):
        repair(tail, 2, targets="other")
