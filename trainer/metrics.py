"""Honest full-catalog retrieval metrics (exact: chunked matrix products, no ANN).

Protocol, for every valid/test row (one held-out positive ``item_idx`` of one user, with the
user's history as of that moment): score every item of the catalog, drop the items the user
interacted with strictly before that moment (``seen_items``; the held-out item itself is
never dropped) and the padding index 0, and find the held-out item's rank.

Ties are resolved in expectation: with ``g`` items scoring strictly higher and ``t`` other
items scoring exactly the same, the target's position is uniform over ``g .. g+t``, so
``HR@K = clamp((K - g) / (t + 1), 0, 1)`` and NDCG@K averages ``1 / log2(pos + 2)`` over those
positions. A model is never credited for an arbitrary tie order (this matters for ItemPop,
whose scores are integer counts). With one held-out item per row, Recall@K equals HR@K.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

DEFAULT_SCORE_BUDGET = 1 << 25  # scores per chunk (32M floats = 128 MB)


def rank_counts(scores: torch.Tensor, targets: torch.Tensor, seen_rows: torch.Tensor, seen_items: torch.Tensor,
                excluded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``scores`` (B, N): how many candidates score strictly higher than the
    target ``targets`` (B,) and how many others tie with it, after dropping ``seen`` items
    (COO pairs ``seen_rows``/``seen_items``, 1-D int64, the row's target exempt) and the
    ``excluded`` (N,) bool columns. Modifies ``scores`` in place. Returns (greater, ties)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_scores = scores[rows, targets].clone()
    low = torch.finfo(scores.dtype).min
    if excluded is not None:
        scores.masked_fill_(excluded.unsqueeze(0), low)
    if seen_rows.numel():
        scores[seen_rows, seen_items] = low
    scores[rows, targets] = target_scores
    greater = (scores > target_scores.unsqueeze(1)).sum(1)
    ties = (scores == target_scores.unsqueeze(1)).sum(1) - 1
    # A target that is itself excluded (unknown item) or scores the lowest value can only
    # be found after every other item: rank it last.
    return greater, ties


def expected_hit_and_ndcg(greater: torch.Tensor, ties: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row expected HR@k and NDCG@k under a uniformly random order of tied items.
    ``greater``, ``ties``: (B,) int64 from ``rank_counts``. Returns two (B,) float64."""
    g = greater.double()
    t = ties.double()
    hit = ((k - g) / (t + 1.0)).clamp(0.0, 1.0)
    discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=greater.device) + 2.0)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64, device=greater.device), discounts.cumsum(0)])
    first = greater.clamp(max=k)
    last = (greater + ties).clamp(max=k - 1) + 1  # exclusive end of positions inside the top k
    inside = torch.where(greater < k, prefix[last] - prefix[first], torch.zeros_like(g))
    return hit, inside / (t + 1.0)


class RankingAccumulator:
    """Sums per-row expected HR/NDCG over batches; ``result()`` gives the means."""

    def __init__(self, ks: Iterable[int]) -> None:
        self.ks = tuple(sorted(set(ks)))
        self.rows = 0
        self.sums: dict[str, float] = {}
        self.rank_sum = 0.0

    def add(self, greater: torch.Tensor, ties: torch.Tensor) -> None:
        self.rows += int(greater.shape[0])
        self.rank_sum += float((greater.double() + ties.double() / 2.0 + 1.0).sum())
        for k in self.ks:
            hit, ndcg = expected_hit_and_ndcg(greater, ties, k)
            for name, values in ((f"hr@{k}", hit), (f"recall@{k}", hit), (f"ndcg@{k}", ndcg)):
                self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())

    def result(self) -> dict[str, float]:
        out = {name: total / max(self.rows, 1) for name, total in sorted(self.sums.items())}
        out["mean_rank"] = self.rank_sum / max(self.rows, 1)
        out["rows"] = float(self.rows)
        return out


def score_chunk_rows(num_items: int, budget: int = DEFAULT_SCORE_BUDGET) -> int:
    """How many query rows to score at once against ``num_items`` candidates."""
    return max(1, budget // max(num_items, 1))


def seen_coo(offsets: torch.Tensor, values: torch.Tensor, row_start: int, row_end: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``row_start:row_end`` of a CSR list (``offsets`` (R+1,), ``values``) as COO pairs
    with row numbers relative to ``row_start``."""
    lo, hi = int(offsets[row_start]), int(offsets[row_end])
    lengths = offsets[row_start + 1:row_end + 1] - offsets[row_start:row_end]
    rows = torch.repeat_interleave(torch.arange(row_end - row_start, device=values.device), lengths)
    return rows, values[lo:hi]


def rank_with_scores(score_fn, targets: torch.Tensor, seen_offsets: torch.Tensor, seen_values: torch.Tensor,
                     excluded: torch.Tensor | None, num_items: int, accumulator: RankingAccumulator,
                     budget: int = DEFAULT_SCORE_BUDGET) -> None:
    """Rank ``targets`` (R,) in chunks: ``score_fn(start, end)`` returns the (end-start, N)
    scores of those rows; seen items come as CSR (``seen_offsets`` (R+1,), ``seen_values``)."""
    step = score_chunk_rows(num_items, budget)
    for start in range(0, targets.shape[0], step):
        end = min(start + step, targets.shape[0])
        scores = score_fn(start, end)
        rows, items = seen_coo(seen_offsets, seen_values, start, end)
        greater, ties = rank_counts(scores, targets[start:end], rows, items, excluded)
        accumulator.add(greater, ties)
