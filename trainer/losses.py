"""Losses of the two-tower task. They live beside the towers, not inside them (docs/style.md 1).

All take L2-normalised tower outputs and the score scale (1 / temperature).

* ``sampled_softmax_loss``: in-batch sampled softmax with logQ correction and
  accidental-hit masking over a candidate set (the global batch's positives, optionally
  followed by uniformly sampled extra items: mixed negative sampling).
* ``pointwise_bce_loss``: the DSSM pointwise objective on a positive and its offline negatives.
* ``mimic_loss``: DAT's adaptive-mimic mechanism; the target side is detached.
* ``category_alignment_loss``: DAT's CAL, covariance alignment of minor categories with the
  major one within the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def candidate_log_q(log_q: torch.Tensor, in_batch: int, uniform: int, num_items: int) -> torch.Tensor:
    """Log of the expected number of times each candidate is sampled into one step's set.

    ``log_q`` (C,): the candidates' log share of training positives (their probability of
    being an in-batch positive). With ``in_batch`` positives and ``uniform`` uniform draws
    over ``num_items`` items per step, an item appears ``in_batch * q + uniform / num_items``
    times in expectation; subtracting the log of that from the logits is the logQ correction
    of mixed negative sampling (Yang et al. 2020). With ``uniform == 0`` it differs from
    ``log_q`` by a constant, which the softmax ignores."""
    expected = in_batch * log_q.exp()
    if uniform:
        expected = expected + uniform / float(num_items)
    return expected.clamp_min(1e-30).log()


def sampled_softmax_logits(user: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor,
                           positive_index: torch.Tensor, positive_item: torch.Tensor,
                           candidate_item: torch.Tensor, log_q: torch.Tensor | None) -> torch.Tensor:
    """Corrected, masked logits (B, C).

    ``user`` (B, d); ``candidates`` (C, d); ``positive_index`` (B,) column of each row's own
    positive; ``positive_item`` (B,) its item index; ``candidate_item`` (C,) item index of
    each candidate; ``log_q`` (C,) or None (see ``candidate_log_q``). A candidate with the same
    item index as the row's positive, other than the positive's own column, is an accidental
    hit and is masked to the lowest finite value."""
    logits = scale * (user @ candidates.T)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    hits = candidate_item.unsqueeze(0) == positive_item.unsqueeze(1)
    hits[torch.arange(user.shape[0], device=user.device), positive_index] = False
    return logits.masked_fill(hits, torch.finfo(logits.dtype).min)


def sampled_softmax_loss(user, candidates, scale, positive_index, positive_item, candidate_item, log_q=None,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (weighted by ``weight`` (B,) if given) cross-entropy of each row's positive
    column against every candidate. Shapes as in ``sampled_softmax_logits``."""
    logits = sampled_softmax_logits(user, candidates, scale, positive_index, positive_item, candidate_item, log_q)
    loss = F.cross_entropy(logits.float(), positive_index, reduction="none")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


def pointwise_bce_loss(user: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                       negative_mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on ``scale * cosine``: label 1 for ``positive`` (B, d), label 0
    for each of ``negatives`` (B, M, d) where ``negative_mask`` (B, M) is True (padding
    slots are ignored). Averaged over all labelled pairs."""
    pos_logit = scale * (user * positive).sum(-1)
    neg_logit = scale * torch.einsum("bd,bmd->bm", user, negatives)
    pos_loss = F.binary_cross_entropy_with_logits(pos_logit.float(), torch.ones_like(pos_logit, dtype=torch.float32),
                                                  reduction="sum")
    neg_loss = F.binary_cross_entropy_with_logits(neg_logit.float(), torch.zeros_like(neg_logit, dtype=torch.float32),
                                                  reduction="none")
    neg_loss = (neg_loss * negative_mask.float()).sum()
    count = user.shape[0] + negative_mask.sum()
    return (pos_loss + neg_loss) / count.clamp_min(1)


def mimic_loss(user_aug: torch.Tensor, item_aug: torch.Tensor, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """DAT adaptive-mimic loss on positive pairs: the user's augmented vector regresses on
    the item tower's output and the item's augmented vector on the user tower's output.
    The targets are detached: this loss trains the augmented vectors only, never the tower
    that produced the target. All (B, d)."""
    return (F.mse_loss(user_aug, item.detach(), reduction="none").sum(-1).mean()
            + F.mse_loss(item_aug, user.detach(), reduction="none").sum(-1).mean())


def category_alignment_loss(item: torch.Tensor, category: torch.Tensor, min_items: int = 2) -> torch.Tensor:
    """DAT category alignment loss: sum over minor categories c (at least ``min_items``
    items in the batch) of ||Cov(major) - Cov(c)||_F^2, where major is the category with
    most items in the batch (ties: lowest index) and Cov is the (d, d) covariance of that
    category's item vectors. ``item`` (B, d), ``category`` (B,) int64. Zero when fewer than
    two categories qualify. Vectorised over categories (one-hot sums, no Python loop)."""
    present, inverse, counts = torch.unique(category, return_inverse=True, return_counts=True)
    onehot = F.one_hot(inverse, num_classes=present.shape[0]).to(item.dtype)  # (B, K)
    n = counts.to(item.dtype).clamp_min(1.0)
    means = (onehot.T @ item) / n.unsqueeze(1)  # (K, d)
    second = torch.einsum("bk,bi,bj->kij", onehot, item, item) / n.view(-1, 1, 1)
    cov = second - means.unsqueeze(2) * means.unsqueeze(1)  # (K, d, d)
    major = int(torch.argmax(counts).item())  # first max = lowest category index among ties
    eligible = counts >= min_items
    eligible[major] = False
    if counts[major] < min_items or not bool(eligible.any()):
        return item.sum() * 0.0
    diff = (cov[eligible] - cov[major].unsqueeze(0)).pow(2).sum(dim=(1, 2))
    return diff.sum()


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``scores`` (N,) for binary ``labels`` (N,), ties counted as one half
    (Mann-Whitney U with average ranks). NaN if either class is empty."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(scores.double())
    sorted_scores = scores.double()[order]
    ranks = torch.empty_like(sorted_scores)
    # average rank within runs of equal scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2.0
    ranks[order] = avg[inverse]
    pos_rank_sum = ranks[labels].sum().item()
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
