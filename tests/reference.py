"""An independent float64 implementation of the paper's formulas, in dense numpy matrix form.

Written separately from lip_cli on purpose: it materialises X W_k, the residual and the full
U_l^T X^T R V_l product, exactly as the paper states the closed form.
"""

from __future__ import annotations

import numpy as np


def targets(labels: np.ndarray, classes: int) -> np.ndarray:
    if labels.ndim == 1:
        return np.eye(classes)[labels]
    return labels.astype(np.float64)


def paper_lip(
    weight: np.ndarray, bias: np.ndarray | None, features: np.ndarray, labels: np.ndarray, k: int
) -> np.ndarray:
    """PSP + LAP on a torch-layout weight (l, q); returns the repaired weight (l, q) in float64."""
    w = weight.astype(np.float64).T  # (q, l)
    x = features.astype(np.float64)  # (n, q)
    y = targets(labels, w.shape[1])  # (n, l)
    if bias is not None:
        y = y - bias.astype(np.float64)[None, :]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    rank = np.linalg.matrix_rank(w)
    w_k = u[:, :k] @ np.diag(s[:k]) @ vt[:k]
    u_l, v_l = u[:, k:rank], vt[k:rank].T
    residual = y - x @ w_k
    numerator = np.diag(u_l.T @ x.T @ residual @ v_l)
    denominator = np.diag(u_l.T @ x.T @ x @ u_l)
    s_l = numerator / denominator
    return (w_k + u_l @ np.diag(s_l) @ v_l.T).T


def least_squares_tail(
    weight: np.ndarray, bias: np.ndarray | None, features: np.ndarray, labels: np.ndarray, k: int
) -> np.ndarray:
    """The tail singular values that minimise ||X W' + 1 b^T - Y||_F^2, by a generic lstsq solve."""
    w = weight.astype(np.float64).T
    x = features.astype(np.float64)
    y = targets(labels, w.shape[1])
    if bias is not None:
        y = y - bias.astype(np.float64)[None, :]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    rank = np.linalg.matrix_rank(w)
    w_k = u[:, :k] @ np.diag(s[:k]) @ vt[:k]
    columns = [np.outer(x @ u[:, i], vt[i]).ravel() for i in range(k, rank)]
    design = np.stack(columns, axis=1)  # (n*l, rank-k)
    target = (y - x @ w_k).ravel()
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    return solution


def logit_scale_lip(
    weight: np.ndarray, bias: np.ndarray | None, features: np.ndarray, labels: np.ndarray, k: int
) -> np.ndarray:
    """The logit-scale variant, densely: targets c (Y - mean_row(Y)) + mean_row(F), F = X W + 1 b^T,
    c = <F - mean_row(F), Y - mean_row(Y)>_F / ||Y - mean_row(Y)||_F^2; then the paper's fit."""
    w = weight.astype(np.float64).T
    x = features.astype(np.float64)
    b = np.zeros(w.shape[1]) if bias is None else bias.astype(np.float64)
    y = targets(labels, w.shape[1])
    logits = x @ w + b[None, :]
    centred_y = y - y.mean(1, keepdims=True)
    centred_f = logits - logits.mean(1, keepdims=True)
    scale = (centred_f * centred_y).sum() / (centred_y**2).sum()
    scaled_targets = scale * centred_y + logits.mean(1, keepdims=True)
    return paper_lip(weight, bias, features, scaled_targets, k)
