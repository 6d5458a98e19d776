"""KCurve's blocked rank-1 updates against the direct computation: one full product per k."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lip_cli import lip
from lip_cli.lip import KCurve, LapStatistics, correct_mask, count_correct, k_grid, singular_values_for_k


def direct_counts(
    stats: LapStatistics, ks: list[int], z: torch.Tensor, labels: torch.Tensor, targets: str
) -> list[int]:
    """The accuracy curve as lip computed it before: logits (Z diag(sigma^(k)) V^T + b) per k."""
    counts = []
    for k in ks:
        sigma = singular_values_for_k(stats, k, targets)[0].to(stats.compute_dtype)
        logits = (z * sigma) @ stats._v.T
        if stats.bias is not None:
            logits = logits + stats.bias.to(stats.compute_dtype)
        counts.append(count_correct(logits, labels))
    return counts


def label_kind(labels: torch.Tensor, classes: int, kind: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "ids":
        return labels
    if kind == "one-hot":
        return torch.nn.functional.one_hot(labels, classes).to(torch.float32)
    if kind == "soft":
        return torch.softmax(
            torch.randn(labels.shape[0], classes, generator=generator, dtype=torch.float64), 1
        )
    candidates = torch.rand(labels.shape[0], classes, generator=generator) < 0.3  # candidate sets
    candidates[torch.arange(labels.shape[0]), labels] = True
    candidates[::7] = False  # some rows with no candidate at all
    return candidates.to(torch.float32)


def fitted_statistics(head, labels: torch.Tensor, dtype: torch.dtype) -> LapStatistics:
    stats = LapStatistics(head.weight, head.bias, compute_dtype=dtype)
    stats.update(head.features, labels)
    return stats


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 90),
    q=st.integers(1, 12),
    l=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["ids", "one-hot", "soft", "candidates"]),
    targets=st.sampled_from(["paper", "logit-scale"]),
    data=st.data(),
)
def test_updates_count_what_one_product_per_k_counts(n, q, l, seed, kind, targets, data) -> None:
    head = make_head(n=n, q=q, l=l, seed=seed, bias=data.draw(st.booleans()))
    labels = label_kind(head.labels, l, kind, seed)
    stats = fitted_statistics(head, labels, torch.float64)
    rank = stats.svd.rank
    ks = data.draw(st.lists(st.integers(0, rank), min_size=1, max_size=8))  # any order, repeats
    block_rows = data.draw(st.integers(1, 40))
    z = stats.project(head.features)
    curve = KCurve(stats, ks, targets)
    curve.block_rows = block_rows
    half = n // 2
    curve.update_projections(z[:half], labels[:half])
    curve.update_projections(z[half:], labels[half:])
    assert curve.correct == direct_counts(stats, ks, z, labels, targets)
    assert curve.samples == n
    hits = curve.row_hits(z, labels)
    assert hits.shape == (len(ks), n) and hits.sum(1).tolist() == curve.correct


def test_the_grid_of_a_large_head_in_float64_and_float32() -> None:
    head = make_head(n=3000, q=40, l=30, seed=11)
    for dtype in (torch.float64, torch.float32):
        stats = fitted_statistics(head, head.labels, dtype)
        ks = k_grid(stats.svd.rank, most=9)
        curve = KCurve(stats, ks, "paper")
        z = stats.project(head.features)
        curve.update_projections(z, head.labels)
        assert curve.correct == direct_counts(stats, ks, z, head.labels, "paper"), dtype
        assert curve.accuracies() == [count / 3000 for count in curve.correct]


def test_ties_go_to_the_first_class_as_with_argmax() -> None:
    head = make_head(n=60, q=6, l=5, seed=12, bias=False)
    features = head.features.clone()
    features[::3] = 0.0  # every logit 0 at every k: class 0 predicted
    labels = head.labels.clone()
    labels[::6] = 0
    labels[3::6] = 4
    stats = fitted_statistics(make_head(n=60, q=6, l=5, seed=12, bias=False), labels, torch.float64)
    z = stats.project(features)
    ks = list(range(stats.svd.rank + 1))
    curve = KCurve(stats, ks, "paper")
    curve.update_projections(z, labels)
    assert curve.correct == direct_counts(stats, ks, z, labels, "paper")
    tied = curve.row_hits(z, labels)[:, ::3]  # the zero rows
    assert torch.equal(tied, (labels[::3] == 0).expand(len(ks), -1))


def test_a_label_tied_with_another_class_goes_to_the_first_of_them() -> None:
    """Rows of zero features have the bias as logits at every k; classes 1 and 4 share the largest
    bias, so they tie exactly: a row labelled 1 is right, one labelled 4 is not, whatever the
    label kind (the fast comparison with the other classes must hand such rows on)."""
    head = make_head(n=200, q=8, l=6, seed=15)
    bias = head.bias.clone()
    bias[1] = bias[4] = bias.max() + 1.0
    features = head.features.clone()
    features[::4] = 0.0
    labels = head.labels.clone()
    labels[::8], labels[4::8] = 1, 4
    for kind in ("ids", "one-hot", "soft", "candidates"):
        kind_labels = label_kind(labels, 6, kind, seed=3)
        stats = LapStatistics(head.weight, bias, compute_dtype=torch.float64)
        stats.update(head.features, kind_labels)
        z = stats.project(features)
        ks = list(range(stats.svd.rank + 1))
        curve = KCurve(stats, ks, "paper")
        curve.block_rows = 17
        curve.update_projections(z, kind_labels)
        assert curve.correct == direct_counts(stats, ks, z, kind_labels, "paper"), kind
        if kind == "ids":
            hits = curve.row_hits(z, kind_labels)
            assert hits[:, ::8].all() and not hits[:, 4::8].any()


def test_a_nan_logit_is_judged_as_argmax_judges_it() -> None:
    head = make_head(n=40, q=5, l=4, seed=16)
    stats = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64)
    stats.update(head.features, head.labels)
    z = stats.project(head.features)
    z[3, 0] = torch.nan  # every logit of row 3 NaN: argmax says class 0
    labels = head.labels.clone()
    labels[3] = 0
    ks = [0, 2, stats.svd.rank]
    curve = KCurve(stats, ks, "paper")
    curve.update_projections(z, labels)
    assert curve.correct == direct_counts(stats, ks, z, labels, "paper")
    assert curve.row_hits(z, labels)[:, 3].all()


def test_a_curve_needs_its_k_fitted_and_some_k(head) -> None:
    with pytest.raises(ValueError, match="every k must be >= that"):
        KCurve(LapStatistics(head.weight, head.bias, first_component=1), [3, 0])
    with pytest.raises(ValueError, match="at least one k"):
        KCurve(LapStatistics(head.weight, head.bias), [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_curve_counts_what_the_cpu_counts() -> None:
    head = make_head(n=700, q=20, l=15, seed=13)
    counts = {}
    for device in ("cpu", "cuda"):
        stats = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64, device=device)
        stats.update(head.features, head.labels)
        curve = KCurve(stats, k_grid(stats.svd.rank))
        curve.update(head.features, head.labels)
        counts[device] = curve.correct
    assert counts["cuda"] == counts["cpu"]


def test_tail_statistics_give_the_curve_of_full_ones() -> None:
    head = make_head(n=400, q=14, l=9, seed=14)
    full = fitted_statistics(head, head.labels, torch.float64)
    tail = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64, first_component=4, svd=full.svd)
    tail.update(head.features, head.labels)
    ks = [9, 4, 6]
    curves = [KCurve(stats, ks, "paper") for stats in (full, tail)]
    for curve in curves:
        curve.update(head.features, head.labels)
    assert curves[0].correct == curves[1].correct
    torch.testing.assert_close(tail.full_projection(head.features), full.project(head.features))


def integer_curve(
    rank: int, classes: int, ks: list[int], dtype: torch.dtype, seed: int, bias: bool
) -> KCurve:
    """A curve whose spectra, changes, V and bias are small integers: every logit is then exact
    whatever the order of the sums, and rows tie often."""
    head = make_head(n=4 * max(rank, classes), q=rank, l=classes, seed=seed, bias=bias)
    stats = fitted_statistics(head, head.labels, dtype)
    curve = KCurve(stats, [min(k, stats.svd.rank) for k in ks])
    generator = torch.Generator().manual_seed(seed)
    small = lambda *shape: torch.randint(-2, 3, shape, generator=generator).to(dtype)  # noqa: E731
    rank = stats.svd.rank
    curve._start, curve._change, curve._v_t = small(rank), small(rank), small(rank, classes)
    curve._ranges = [(low, high, curve._v_t[low:high]) for high, low in pairwise(curve._steps)]
    curve._bias = small(classes) if bias else None
    return curve


def integer_logits(curve: KCurve, z: torch.Tensor, step: int) -> torch.Tensor:
    """The logits at one step of an integer curve, in one product."""
    spectrum = curve._start.clone()
    for low, high, _ in curve._ranges[:step]:
        spectrum[low:high] += curve._change[low:high]
    logits = (z * spectrum) @ curve._v_t
    return logits if curve._bias is None else logits + curve._bias


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70),
    rank=st.integers(1, 7),
    classes=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(["ids", "one-hot", "scaled one-hot", "candidates", "tied soft"]),
    data=st.data(),
)
def test_exact_ties_are_judged_as_argmax_judges_them(n, rank, classes, seed, dtype, kind, data) -> None:
    ks = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=5))
    curve = integer_curve(rank, classes, ks, dtype, seed, data.draw(st.booleans()))
    curve.block_rows = data.draw(st.integers(1, 30))
    generator = torch.Generator().manual_seed(seed + 1)
    z = torch.randint(-2, 3, (n, curve._v_t.shape[0]), generator=generator).to(dtype)
    ids = torch.randint(classes, (n,), generator=generator)
    labels = {
        "ids": ids,
        "one-hot": torch.nn.functional.one_hot(ids, classes).to(dtype),
        "scaled one-hot": torch.nn.functional.one_hot(ids, classes) * torch.randint(1, 4, (n, 1)),
        "candidates": (torch.rand(n, classes, generator=generator) < 0.4).float(),  # some rows empty
        "tied soft": torch.randint(0, 3, (n, classes), generator=generator).to(dtype),
    }[kind]
    expected = torch.stack(
        [correct_mask(integer_logits(curve, z, curve._steps.index(k)), labels) for k in curve.ks]
    )
    assert torch.equal(curve.row_hits(z, labels), expected)


def same_k_accuracies(
    model: Path, train: Path, val: Path, targets: str | None = None, ks: tuple[int, ...] = (0, 3, 8)
) -> dict[str, dict]:
    """Training accuracy at each k of `ks` as `lip inspect --features`, `lip repair --k auto`'s curve
    and `lip repair --k N` report it, with the default targets or `targets`."""
    from lip_cli.jobs import inspect as inspect_job
    from lip_cli.jobs.repair import RepairRequest, repair_checkpoint

    chosen = {} if targets is None else {"targets": targets}
    inspected = inspect_job.inspect_layer(model, None, train, **chosen)
    auto = repair_checkpoint(RepairRequest(model, train, "auto", val_features=val, dry_run=True, **chosen))
    given = {
        k: repair_checkpoint(
            RepairRequest(model, train, k, val_features=val, dry_run=True, force_write=True, **chosen)
        )
        for k in ks
    }
    assert inspected.targets == auto.targets == given[0].targets
    return {
        "targets": inspected.targets,
        "full_inspect": {point["k"]: point["train_accuracy"] for point in inspected.k_curve},
        "inspect": {point["k"]: point["train_accuracy"] for point in inspected.k_curve if point["k"] in ks},
        "auto": {point["k"]: point["train_accuracy"] for point in auto.k_curve if point["k"] in ks},
        "given": {k: report.accuracy["train_after"] for k, report in given.items()},
    }


def test_a_memorised_head_gets_the_same_accuracy_at_a_k_everywhere(tmp_path) -> None:
    """A linear head trained with cross-entropy until it fits its 40% noisy labels (more inputs than
    rows): inspect's k curve, auto's curve and a given k agree at every k, under the default
    targets and the paper's, and the two rules differ on it (so agreement is not by accident)."""
    generator = torch.Generator().manual_seed(5)
    classes, q, n = 10, 160, 120
    centres = torch.randn(classes, q, generator=generator)
    clean = torch.randint(classes, (n + 200,), generator=generator)
    features = centres[clean] + 1.5 * torch.randn(n + 200, q, generator=generator)
    flip = torch.rand(n, generator=generator) < 0.4
    noisy = torch.where(flip, torch.randint(classes, (n,), generator=generator), clean[:n])
    torch.manual_seed(5)
    head = torch.nn.Linear(q, classes)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(head(features[:n]), noisy).backward()
        optimiser.step()
    torch.save({"fc.weight": head.weight.detach(), "fc.bias": head.bias.detach()}, tmp_path / "model.pt")
    np.save(tmp_path / "train.npy", features[:n].numpy())
    np.save(tmp_path / "train.labels.npy", noisy.numpy())
    np.save(tmp_path / "val.npy", features[n:].numpy())
    np.save(tmp_path / "val.labels.npy", clean[n:].numpy())
    curves = {}
    for targets in (None, "paper"):
        seen = same_k_accuracies(tmp_path / "model.pt", tmp_path / "train.npy", tmp_path / "val.npy", targets)
        assert seen["full_inspect"][classes] == 1.0  # it memorised its noisy labels
        assert seen["inspect"] == seen["auto"] == seen["given"], seen
        assert seen["targets"] == (targets or lip.DEFAULT_TARGETS)
        curves[seen["targets"]] = seen["inspect"]
    assert curves["paper"] != curves["logit-scale"]
