"""The training task: one batch of pairs -> the loss (torchrec's ``TwoTowerTrainTask``).

It knows the towers, the item feature store and the distributed context, never the
optimizer. Candidates for the sampled softmax are the positives of the GLOBAL batch (every
rank's, gathered with gradient) followed by each rank's uniformly sampled extra items, so
every rank sees global negatives (docs/design.md; trainer/distributed.py explains why the
gradient then equals the single-process one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.distributed import DistContext
from trainer.item_store import ItemFeatureStore
from trainer.losses import (
    candidate_log_q,
    category_alignment_loss,
    mimic_loss,
    pointwise_bce_loss,
    sampled_softmax_loss,
)
from trainer.towers import TowerOutput


def _positives_first(gathered: torch.Tensor, world: int, rows: int) -> torch.Tensor:
    """Rank-major ``[rank 0's rows positives, its extras, rank 1's ...]`` as ``[every rank's
    positives, every rank's extras]``, the candidate order of the sampled softmax."""
    per_rank = gathered.view(world, gathered.shape[0] // world, *gathered.shape[1:])
    if per_rank.shape[1] == rows:
        return gathered
    tail = per_rank.shape[2:]
    return torch.cat([per_rank[:, :rows].reshape(world * rows, *tail), per_rank[:, rows:].reshape(-1, *tail)])


@dataclass
class StepLosses:
    total: torch.Tensor
    parts: dict[str, float]


class TwoTowerTrainTask:
    """``loss(batch, step)``: the configured objective on one batch (dict of int64 tensors
    on ``ctx.device``: user inputs, ``item_idx`` (B,), for BCE ``neg_item_idx`` (B, M)).

    ``model`` may be the DDP-wrapped module: it is only called, never inspected."""

    def __init__(self, model: nn.Module, store: ItemFeatureStore, config: TrainConfig, ctx: DistContext) -> None:
        self.model = model
        self.store = store
        self.config = config
        self.ctx = ctx
        self.valid_items = torch.nonzero(store.valid, as_tuple=False).flatten()
        if self.valid_items.numel() == 0:
            raise ValueError("features/items has no items: nothing to train on")

    def _items(self, item_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"item_idx": item_idx, **self.store.features(item_idx)}

    def _uniform_items(self, count: int, step: int) -> torch.Tensor:
        """``count`` items drawn uniformly from the catalog; seeded by (seed, rank, step)."""
        generator = torch.Generator(device="cpu").manual_seed(
            (self.config.seed * 1_000_003 + self.ctx.rank) * 1_000_003 + step)
        picks = torch.randint(0, self.valid_items.numel(), (count,), generator=generator)
        return self.valid_items[picks.to(self.valid_items.device)]

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> StepLosses:
        if self.config.loss == "bce":
            return self._pointwise(batch)
        return self._softmax(batch, step)

    def _user_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k not in ("item_idx", "neg_item_idx")}

    def _softmax(self, batch: dict[str, torch.Tensor], step: int) -> StepLosses:
        cfg, ctx = self.config, self.ctx
        positives = batch["item_idx"]
        rows = positives.shape[0]
        extra = self._uniform_items(cfg.mixed_negatives, step) if cfg.mixed_negatives else positives[:0]
        local_items = torch.cat([positives, extra])
        out: TowerOutput = self.model(self._user_inputs(batch), self._items(local_items))
        pos_vec = out.item[:rows]
        # One gather of every rank's [positives, extras] (vectors with gradient, and their item
        # ids), reordered to [all ranks' positives, all ranks' extras]: half the collectives of
        # gathering positives and extras apart (2 forward + 1 backward instead of 4 + 2).
        candidates = _positives_first(ctx.gather_with_grad(out.item), ctx.world_size, rows)
        with torch.no_grad():
            candidate_items = _positives_first(ctx.gather_with_grad(local_items), ctx.world_size, rows)
        log_q = None
        if cfg.logq:
            log_q = candidate_log_q(self.store.log_q[candidate_items], rows * ctx.world_size,
                                    cfg.mixed_negatives * ctx.world_size, self.valid_items.numel())
        positive_index = ctx.rank * rows + torch.arange(rows, device=positives.device)
        main = sampled_softmax_loss(out.user, candidates, out.scale, positive_index, positives, candidate_items, log_q)
        return self._with_dat(main, out, pos_vec, candidates[: rows * ctx.world_size],
                              candidate_items[: rows * ctx.world_size], "softmax")

    def _pointwise(self, batch: dict[str, torch.Tensor]) -> StepLosses:
        positives = batch["item_idx"]
        negatives = batch["neg_item_idx"]
        rows, width = negatives.shape
        out: TowerOutput = self.model(self._user_inputs(batch),
                                      self._items(torch.cat([positives, negatives.flatten()])))
        pos_vec = out.item[:rows]
        neg_vec = out.item[rows:].view(rows, width, -1)
        main = pointwise_bce_loss(out.user, pos_vec, neg_vec, negatives > 0, out.scale)
        global_pos = self.ctx.gather_with_grad(pos_vec)
        with torch.no_grad():
            global_items = self.ctx.gather_with_grad(positives)
        return self._with_dat(main, out, pos_vec, global_pos, global_items, "bce")

    def _with_dat(self, main: torch.Tensor, out: TowerOutput, pos_vec: torch.Tensor, global_pos: torch.Tensor,
                  global_items: torch.Tensor, name: str) -> StepLosses:
        cfg = self.config
        total = main
        parts = {name: float(main.detach())}
        if cfg.dat_mimic_weight and out.user_aug is not None and out.item_aug is not None:
            mimic = mimic_loss(out.user_aug, out.item_aug[: pos_vec.shape[0]], out.user, pos_vec)
            total = total + cfg.dat_mimic_weight * mimic
            parts["mimic"] = float(mimic.detach())
        if cfg.dat_cal_weight:
            cal = category_alignment_loss(global_pos, self.store.category[global_items])
            total = total + cfg.dat_cal_weight * cal
            parts["cal"] = float(cal.detach())
        return StepLosses(total=total, parts=parts)
