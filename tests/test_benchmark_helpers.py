"""The accuracy benchmark's own pieces: label noise, the CIFAR-100 reader, the ResNet-34 path."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import noisy_labels  # noqa: E402


def test_symmetric_noise_flips_to_other_classes_at_the_rate() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 20_000)
    noisy = noisy_labels.corrupt(labels, 0.3, "symmetric", 10, seed=1)
    flipped = noisy != labels
    assert abs(flipped.mean() - 0.3) < 0.02
    assert np.array_equal(noisy_labels.corrupt(labels, 0.0, "symmetric", 10, seed=1), labels)


def test_asymmetric_noise_stays_in_the_superclass() -> None:
    groups = np.array([0, 1, 0, 1, 0, 1])  # superclasses {0, 2, 4} and {1, 3, 5}
    labels = np.arange(6).repeat(100)
    noisy = noisy_labels.corrupt(labels, 1.0, "asymmetric", 6, seed=0, groups=groups)
    assert set(zip(labels.tolist(), noisy.tolist(), strict=True)) == {
        (0, 2),
        (2, 4),
        (4, 0),
        (1, 3),
        (3, 5),
        (5, 1),
    }
    default = noisy_labels.corrupt(np.arange(100), 1.0, "asymmetric", 100, seed=0)
    assert np.array_equal(default[:6], [1, 2, 3, 4, 0, 6])


def write_fake_cifar(root: Path, per_split: int = 40) -> Path:
    folder = root / noisy_labels.CIFAR_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        fine = rng.integers(0, 100, per_split)
        part = {
            b"data": rng.integers(0, 256, (per_split, 3072), dtype=np.uint8),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
        }
        with open(folder / split, "wb") as handle:
            pickle.dump(part, handle)
    return folder


def test_cifar100_is_found_and_read(tmp_path: Path) -> None:
    assert noisy_labels.find_cifar100(tmp_path) is None
    folder = write_fake_cifar(tmp_path)
    assert noisy_labels.find_cifar100(tmp_path) == folder
    x_train, y_train, x_test, y_test, groups = noisy_labels.load_cifar100(folder)
    assert (
        x_train.shape == (40, 3, 32, 32)
        and x_train.dtype == np.float32
        and 0 <= x_train.min() <= x_train.max() <= 1
    )
    assert y_train.shape == (40,) and x_test.shape == (40, 3, 32, 32)
    assert all(groups[c] == c // 5 for c in set(y_train.tolist()))


def test_cifar100_reader_runs_no_pickled_code(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "train", "wb") as handle:
        pickle.dump({b"data": Payload()}, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        noisy_labels.load_cifar100(folder)
    assert not marker.exists()


def test_cifar100_setting_runs_end_to_end(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path, per_split=48)
    row = noisy_labels.run_cifar100(folder, "asymmetric", 0.2, seed=0, epochs=1, device="cpu")
    assert 0.0 <= row["original"] <= 1.0
    assert {"psp k=10", "lip k=75", "lip-ls k=25", "cross-fit|logit-scale", "holdout|paper"} <= set(row)
    assert 0.0 <= row["train_noisy"] <= 1.0
    from lip_cli import lip, selection

    gain, best = row["oracle paper"]  # >= 0 by construction (the rank is on the grid): check what can fail
    assert best in selection.k_grid(lip.head_svd(row["weight"]).rank)
    assert -100 * row["original"] <= gain <= 100 * (1 - row["original"])  # a change of a test accuracy


@pytest.mark.parametrize("protocol, cross_fit", [("split 50/50", False), ("cross-fit", True)])
def test_the_benchmarks_protocols_are_what_auto_k_decides(
    protocol: str, cross_fit: bool, monkeypatch
) -> None:
    """The accuracy table's protocol rows come from benchmarks/selection_protocols.py: the same
    decisions as lip's own selection.auto_k on the same rows (its default, and cross-fitted)."""
    import selection_protocols
    import torch

    from lip_cli import power, selection
    from lip_cli.lip import LapStatistics

    monkeypatch.setattr(power, "rows_needed", lambda *args, **kwargs: None)  # no part in a decision

    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)
        x = torch.randn(300, 8, generator=generator, dtype=torch.float64)
        y = (x[:, :5] + 0.8 * torch.randn(300, 5, generator=generator, dtype=torch.float64)).argmax(1)
        stats = LapStatistics(weight, torch.zeros(5, dtype=torch.float64))
        stats.update(x[:150], y[:150])
        z, labels = stats.project(x[150:]), y[150:]
        for targets in ("paper", "logit-scale", "auto"):
            ours = selection_protocols.run_protocol(protocol, stats, z, labels, seed, targets)
            confirm = selection.split_rows(torch.ones(150, dtype=torch.bool), seed)
            parts = [(z[~confirm], labels[~confirm])], [(z[confirm], labels[confirm])]
            decision = selection.auto_k(stats, *parts, targets, cross_fit=cross_fit)
            assert (ours["k"], ours["best_k"], ours["confirmed"]) == (
                decision.k,
                decision.best_k,
                decision.confirmed,
            )
            assert ours["targets"] == decision.targets and ours["p"] == pytest.approx(
                decision.p_value if decision.best_k != decision.rank else 1.0
            )


def test_the_set_up_text_comes_from_the_code_and_matches_the_published_run() -> None:
    """results_text's set-up paragraphs take sizes, epochs and shares from the code; the published
    accuracy section (seeds 4, short epochs 8) holds them verbatim."""
    text = "\n".join(noisy_labels.setup_text(8, 4))
    assert text in (Path(noisy_labels.HERE) / "RESULTS.md").read_text()
    original = noisy_labels.SETS["digits MLP"]
    noisy_labels.SETS["digits MLP"] = (*original[:4], (8, 601))
    try:
        assert "601\n(digits MLP)" in "\n".join(noisy_labels.setup_text(8, 4))
    finally:
        noisy_labels.SETS["digits MLP"] = original


def _row(changes: list[float], confirmed: list[bool]) -> list[dict]:
    return [
        {"confirmed": c, "change": x, "k": 3, "best_k": 3, "targets": "logit-scale", "p": 0.01}
        for x, c in zip(changes, confirmed, strict=True)
    ]


def test_tally_counts_confirmed_gains_and_losses_only() -> None:
    decisions = _row([2.0, -1.0, 0.0, 5.0, -3.0], [True, True, True, False, False])
    assert noisy_labels._tally(decisions) == (1, 1, 5)  # an unconfirmed or zero change counts neither


def test_setting_line_reports_means_oracles_and_tallies() -> None:
    def row(original: float, paper: float, ls: float, change: float, confirmed: bool) -> dict:
        decision = {
            "confirmed": confirmed,
            "change": change,
            "k": 4,
            "best_k": 4,
            "targets": "logit-scale",
            "p": 0.02,
        }
        unconfirmed = {"confirmed": False, "change": 0.0, "k": 10, "best_k": 7, "targets": "paper", "p": 0.4}
        out = {
            "original": original,
            "train_noisy": 0.9,
            "oracle paper": (paper, 3),
            "oracle logit-scale": (ls, 4),
        }
        for targets in noisy_labels.TARGET_CHOICES:
            out[f"{noisy_labels.DEFAULT}|{targets}"] = decision if targets == "logit-scale" else unconfirmed
        for targets in noisy_labels.lip.TARGETS:
            out[f"holdout|{targets}"] = unconfirmed
        return out

    rows = [row(0.80, 1.0, 3.0, 2.5, True), row(0.70, 0.0, 1.0, -1.5, True)]
    cells = [
        cell.strip()
        for cell in noisy_labels.setting_line("net", "memorise", "symmetric", 0.2, rows).strip("|").split("|")
    ]
    assert cells[:5] == ["net", "memorise", "symmetric", "0.2", "90.0"]
    assert cells[5] == "75.0 ± 7.1"  # mean ± sd of the clean test accuracy, in %
    assert cells[6:9] == ["+0.5", "+2.0", "+2.0 (+1.0 to +3.0)"]  # oracle paper, ls, best (worst to best)
    assert cells[9:12] == ["0 / 0", "1 / 1", "0 / 0"]  # real / lost per targets
    assert cells[12] == "**4** ls p 0.02 (+2.5); **4** ls p 0.02 (-1.5)"
    assert cells[13] == "0 / 0 of 4"
