"""Evaluate a model (and the ItemPop baseline, in the same pass) on a valid/test snapshot.

Full-catalog and exact (see ``trainer.metrics`` for the protocol and the tie rule). ItemPop
scores every item by its number of training positives (``features/items.n_positives``,
counted on the train split only), so both rankers see exactly the same rows, exclusions and
tie handling. AUC is the pointwise one of the DSSM setup: each held-out positive against
its offline random-kind negatives, pooled over rows.
"""

from __future__ import annotations

import torch
from torch import nn

from lake_contract.delta_snapshot import DeltaSnapshot
from trainer.data import iter_eval_batches
from trainer.feature_schema import FeatureSchema
from trainer.item_store import ItemFeatureStore
from trainer.losses import binary_auc
from trainer.metrics import RankingAccumulator, rank_with_scores


@torch.no_grad()
def embed_catalog(model: nn.Module, store: ItemFeatureStore, device: torch.device, batch: int = 65_536
                  ) -> torch.Tensor:
    """Item-tower vectors of every item index: (num_items, d) float32 on ``device`` (row 0 and
    unknown rows are embedded too; callers exclude them with ``store.valid``)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, store.num_items, batch):
        idx = torch.arange(start, min(start + batch, store.num_items), device=device)
        parts.append(model.embed_items({"item_idx": idx, **store.features(idx)}).float())
    model.train(was_training)
    return torch.cat(parts)


@torch.no_grad()
def evaluate_split(model: nn.Module, store: ItemFeatureStore, snapshot: DeltaSnapshot, schema: FeatureSchema,
                   ks: tuple[int, ...], device: torch.device, negatives_width: int = 8,
                   with_itempop: bool = True) -> dict[str, dict[str, float]]:
    """``{"model": {...}, "itempop": {...}}`` with hr@K, recall@K, ndcg@K, mean_rank, rows,
    and for the model ``auc`` when the rows carry random negatives."""
    was_training = model.training
    model.eval()
    catalog = embed_catalog(model, store, device)
    excluded = ~store.valid.to(device)
    popularity = store.popularity.to(device).float()
    n_items = catalog.shape[0]
    model_acc, pop_acc = RankingAccumulator(ks), RankingAccumulator(ks)
    auc_scores, auc_labels = [], []
    for batch in iter_eval_batches(snapshot, schema, negatives_width=negatives_width):
        users = {k: v.to(device) for k, v in batch.users.items()}
        targets = batch.item_idx.to(device)
        offsets, values = batch.seen_offsets.to(device), batch.seen_values.to(device)
        user_vec = model.embed_users(users).float()
        rank_with_scores(lambda s, e, u=user_vec: u[s:e] @ catalog.T, targets, offsets, values, excluded, n_items,
                         model_acc)
        if with_itempop:
            rank_with_scores(lambda s, e: popularity.unsqueeze(0).expand(e - s, -1).clone(), targets, offsets,
                             values, excluded, n_items, pop_acc)
        if batch.random_negatives is not None:
            negs = batch.random_negatives.to(device)
            mask = negs > 0
            pos_score = (user_vec * catalog[targets]).sum(-1)
            neg_score = torch.einsum("bd,bmd->bm", user_vec, catalog[negs])
            auc_scores += [pos_score, neg_score[mask]]
            auc_labels += [torch.ones_like(pos_score), torch.zeros(int(mask.sum()), device=device)]
    model.train(was_training)
    result = {"model": model_acc.result()}
    if auc_scores:
        result["model"]["auc"] = binary_auc(torch.cat(auc_scores).cpu(), torch.cat(auc_labels).cpu())
    if with_itempop:
        result["itempop"] = pop_acc.result()
    return result
