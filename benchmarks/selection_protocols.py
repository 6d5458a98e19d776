"""Ways to choose and confirm k on one validation set, measured side by side by noisy_labels.py.

Each protocol gets the head's statistics, the validation rows' projections and labels, a seed and
the targets ("paper", "logit-scale" or "auto": both tried), and returns what it would apply: k,
targets, the p-value it was judged by and whether the change passed at alpha (per test, after any
multiplicity correction). `split 50/50` is what `lip repair --k auto` did before this comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lip_cli import lip, selection

PROTOCOLS = {  # name: (share of the rows that confirm, candidate ks, cross-fitted)
    "split 50/50": (0.5, "grid", False),
    "split 30/70": (0.7, "grid", False),
    "split 70/30": (0.3, "grid", False),
    "coarse 50/50": (0.5, "coarse", False),
    "cross-fit": (0.5, "grid", True),
}
COARSE = 9  # k values of the smaller candidate set, spread over 0..rank


def _choose(stats: lip.LapStatistics, rows: selection.Rows, targets: str, candidates: str) -> tuple[str, int]:
    """The (targets, k) with the best accuracy on `rows`; ties: the larger k, then the paper's targets."""
    options = lip.TARGETS if targets == selection.AUTO_TARGETS else (targets,)
    scored = []
    for option in options:
        if candidates == "grid":
            ks, accuracies = selection.selection_curve(stats, rows, option)
        else:
            ks = lip.k_grid(stats.svd.rank, COARSE)
            accuracies = selection.curve(stats, rows, ks, option)
        best = selection.best_k(ks, accuracies)
        scored.append((accuracies[ks.index(best)], best, option == "paper", option))
    _, k, _, option = max(scored)
    return option, k


def _judge(
    stats: lip.LapStatistics, chooses: selection.Rows, confirms: selection.Rows, targets: str, candidates: str
) -> tuple[str, int, float]:
    option, k = _choose(stats, chooses, targets, candidates)
    if k == stats.svd.rank:
        return option, k, 1.0
    test = selection.compare_heads(stats, k, option, confirms)
    return option, k, selection.mcnemar_p_value(test.gains, test.losses)


def run_protocol(
    name: str, stats: lip.LapStatistics, z: Tensor, y: Tensor, seed: int, targets: str, alpha: float = 0.05
) -> dict:
    """What protocol `name` applies on validation rows (z, y): k, targets, p and confirmed."""
    share, candidates, cross = PROTOCOLS[name]
    confirm = selection.split_rows(torch.ones(len(y), dtype=torch.bool), seed, share)
    first, second = [(z[~confirm], y[~confirm])], [(z[confirm], y[confirm])]
    tried = [_judge(stats, first, second, targets, candidates)]
    if cross:
        tried.append(_judge(stats, second, first, targets, candidates))
    option, k, p = min(tried, key=lambda item: item[2])
    confirmed = k != stats.svd.rank and p <= alpha / len(tried)
    return {
        "k": k if confirmed else stats.svd.rank,
        "best_k": k,
        "targets": option,
        "p": p,
        "confirmed": confirmed,
    }
