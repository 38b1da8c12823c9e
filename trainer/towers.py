"""The user tower and the item tower: plain ``nn.Module``s (docs/style.md item 1).

Both towers embed their fields to ``(batch, fields, field_dim)``, optionally reweight the
fields with SENet, flatten, (DAT) append the augmented vector, and map through an MLP to an
L2-normalised ``(batch, out_dim)`` vector. The user tower also pools the point-in-time
watch history through the item tower's OWN item-id embedding table (YouTube-DNN), so a
history item and a candidate item share one representation.

Inputs are dicts of int64 tensors:

* users: ``user_idx`` (B,), ``hist`` (B, N) most recent first, 0-padded, and one (B,) or
  (B, 16) tensor per ``FeatureSchema.user_fields`` entry;
* items: ``item_idx`` (B,) and one (B,) or (B, 16) tensor per ``FeatureSchema.item_fields``
  entry (from the ``ItemFeatureStore``).

Index 0 is unknown/padding everywhere: its embedding row is zero and gets no gradient.

History encoders (``ModelConfig.history_pooling``): ``mean``, ``mean+recent``, ``attention``
(one learned query) pool the history; ``transformer`` (``SequentialHistory``) runs causal
self-attention blocks over it (SASRec-style) and reads the state at the most recent slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.feature_schema import FeatureSchema, FieldSpec

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
EMBEDDING_INIT_STD = 0.05


def _embedding(rows: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(rows, dim, padding_idx=0)
    nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
    with torch.no_grad():
        table.weight[0].zero_()
    return table


def masked_mean(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``vectors`` (B, L, d) over positions where ``mask`` (B, L) is True; zeros for
    rows with no position."""
    weights = mask.to(vectors.dtype).unsqueeze(-1)
    return (vectors * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class SENet(nn.Module):
    """Squeeze-and-excitation over fields: squeeze = mean of each field's embedding, then
    two FC layers (reduction ``r``) with ReLU and sigmoid give one weight per field, which
    rescales that field's embedding. (B, F, d) -> (B, F, d)."""

    def __init__(self, num_fields: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, num_fields // reduction)
        self.excite = nn.Sequential(nn.Linear(num_fields, hidden), nn.ReLU(), nn.Linear(hidden, num_fields),
                                    nn.Sigmoid())

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        weights = self.excite(fields.mean(dim=-1))  # (B, F)
        return fields * weights.unsqueeze(-1)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class FieldEmbeddings(nn.Module):
    """One embedding table per field; multi-valued fields are mean-pooled over non-zero
    indices. ``forward`` returns (B, F, dim) in ``fields`` order."""

    def __init__(self, fields: tuple[FieldSpec, ...], dim: int) -> None:
        super().__init__()
        self.specs = fields
        self.tables = nn.ModuleDict({f.name: _embedding(f.size, dim) for f in fields})

    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for spec in self.specs:
            idx = inputs[spec.name]
            vec = self.tables[spec.name](idx)
            if spec.kind == "multi_valued":
                vec = masked_mean(vec, idx > 0)
            out.append(vec)
        return out


class CausalBlock(nn.Module):
    """One pre-norm transformer block: multi-head self-attention under a boolean ``allowed``
    (B, N, N) mask (True = query i may read key j), then a position-wise feed-forward layer
    (width 4 x dim), each with dropout and a residual connection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)  # (B, H, N, N)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.dropout(self.proj(attended))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class SequentialHistory(nn.Module):
    """Causal self-attention over the point-in-time history (SASRec-style).

    ``hist`` (B, N) is most recent first and right-padded with 0 (``lake_contract.
    feature_contract``): slot 0 is the latest event, slot i the (i+1)-th latest. Each slot
    embeds its item through the item tower's own table plus a learned embedding of its slot
    (recency rank); ``seq_layers`` ``CausalBlock``s follow, where slot i attends to itself
    and the OLDER real events j > i only: never to a more recent event (its future), never to
    padding. A padding slot attends only to itself, so no row is left without a key, and its
    state is zeroed after every block. The user's field is the final state at slot 0 (the
    most recent event, which therefore sees the whole history); a row without history gets
    the zero vector, as masked mean pooling gives it.
    """

    def __init__(self, config: ModelConfig, history_length: int) -> None:
        super().__init__()
        dim = config.field_dim
        self.positions = nn.Parameter(torch.randn(max(history_length, 1), dim) * EMBEDDING_INIT_STD)
        self.dropout = nn.Dropout(config.seq_dropout)
        self.blocks = nn.ModuleList(CausalBlock(dim, config.seq_heads, config.seq_dropout)
                                    for _ in range(config.seq_layers))
        self.norm = nn.LayerNorm(dim)

    @staticmethod
    def allowed(mask: torch.Tensor) -> torch.Tensor:
        """(B, N, N) boolean: query slot i may read key slot j when j is i itself, or an older
        (j > i) real event."""
        n = mask.shape[1]
        slots = torch.arange(n, device=mask.device)
        older = slots.view(1, n) > slots.view(n, 1)  # [i, j] = j > i
        itself = torch.eye(n, dtype=torch.bool, device=mask.device)
        return itself.unsqueeze(0) | (older.unsqueeze(0) & mask.unsqueeze(1))

    def states(self, hist: torch.Tensor, item_table: nn.Embedding) -> torch.Tensor:
        """(B, N, d): the final state of every slot (zero at padding slots)."""
        mask = hist > 0
        keep = mask.unsqueeze(-1).to(self.positions.dtype)
        x = self.dropout(item_table(hist) + self.positions[: hist.shape[1]]) * keep
        allowed = self.allowed(mask)
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.norm(x) * keep

    def forward(self, hist: torch.Tensor, item_table: nn.Embedding) -> torch.Tensor:
        """(B, d): the state at the most recent slot."""
        return self.states(hist, item_table)[:, 0]


class HistoryPooling(nn.Module):
    """Pools ``hist`` (B, N) through the shared item-id table into one or two fields."""

    def __init__(self, config: ModelConfig, history_length: int) -> None:
        super().__init__()
        self.kind = config.history_pooling
        self.recent_k = config.recent_k
        self.seq_mean_field = config.seq_mean_field
        if self.kind == "attention":
            self.positions = nn.Parameter(torch.randn(max(history_length, 1), config.field_dim) * EMBEDDING_INIT_STD)
            self.query = nn.Parameter(torch.randn(config.field_dim) * EMBEDDING_INIT_STD)
        elif self.kind == "transformer":
            self.sequence = SequentialHistory(config, history_length)

    @property
    def num_fields(self) -> int:
        if self.kind == "transformer":
            return 2 if self.seq_mean_field else 1
        return 2 if self.kind in ("mean+recent", "attention") else 1

    def forward(self, hist: torch.Tensor, item_table: nn.Embedding) -> list[torch.Tensor]:
        if self.kind == "transformer":
            sequence = self.sequence(hist, item_table)
            return [masked_mean(item_table(hist), hist > 0), sequence] if self.seq_mean_field else [sequence]
        vectors = item_table(hist)  # (B, N, d)
        mask = hist > 0
        pooled = [masked_mean(vectors, mask)]
        if self.kind == "mean+recent":
            k = min(self.recent_k, hist.shape[1])
            pooled.append(masked_mean(vectors[:, :k], mask[:, :k]))
        elif self.kind == "attention":
            keys = vectors + self.positions[: hist.shape[1]]
            scores = (keys @ self.query) / math.sqrt(keys.shape[-1])
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=1) * mask.to(scores.dtype)
            pooled.append((weights.unsqueeze(-1) * vectors).sum(1))
        return pooled


class _Tower(nn.Module):
    """Fields -> (SENet) -> flatten (+ DAT augmented vector) -> MLP -> L2-normalised."""

    def __init__(self, config: ModelConfig, num_fields: int, senet: bool, aug_rows: int | None) -> None:
        super().__init__()
        self.senet = SENet(num_fields, config.senet_reduction) if senet else None
        self.augmented = _embedding(aug_rows, config.out_dim) if aug_rows else None
        in_dim = num_fields * config.field_dim + (config.out_dim if aug_rows else 0)
        self.mlp = mlp(in_dim, config.hidden, config.out_dim, config.activation, config.dropout)

    def encode(self, fields: list[torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        stacked = torch.stack(fields, dim=1)  # (B, F, d)
        if self.senet is not None:
            stacked = self.senet(stacked)
        flat = stacked.flatten(1)
        aug = None
        if self.augmented is not None:
            aug = self.augmented(ids)
            flat = torch.cat([flat, aug], dim=1)
        return F.normalize(self.mlp(flat), dim=-1), aug


class ItemTower(_Tower):
    """Item id + item fields -> (B, out_dim). Owns the item-id table the user tower pools."""

    def __init__(self, config: ModelConfig, schema: FeatureSchema) -> None:
        super().__init__(config, 1 + len(schema.item_fields), config.senet_item,
                         schema.num_items if config.dat else None)
        self.item_embedding = _embedding(schema.num_items, config.field_dim)
        self.fields = FieldEmbeddings(schema.item_fields, config.field_dim)

    def forward(self, items: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = items["item_idx"]
        return self.encode([self.item_embedding(ids), *self.fields(items)], ids)


class UserTower(_Tower):
    """User id (optional) + user fields + pooled history -> (B, out_dim)."""

    def __init__(self, config: ModelConfig, schema: FeatureSchema) -> None:
        history = HistoryPooling(config, schema.history_length)
        num_fields = int(config.use_user_id) + len(schema.user_fields) + history.num_fields
        super().__init__(config, num_fields, config.senet_user, schema.num_users if config.dat else None)
        self.history = history
        self.user_embedding = _embedding(schema.num_users, config.field_dim) if config.use_user_id else None
        self.fields = FieldEmbeddings(schema.user_fields, config.field_dim)

    def forward(self, users: dict[str, torch.Tensor], item_table: nn.Embedding
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = users["user_idx"]
        fields = [self.user_embedding(ids)] if self.user_embedding is not None else []
        fields += self.fields(users)
        fields += self.history(users["hist"], item_table)
        return self.encode(fields, ids)


@dataclass
class TowerOutput:
    """``user`` (B, d) and ``item`` (C, d) L2-normalised; ``user_aug`` (B, d) / ``item_aug``
    (C, d) the DAT augmented vectors (None without DAT); ``scale`` = 1 / temperature."""

    user: torch.Tensor
    item: torch.Tensor
    user_aug: torch.Tensor | None
    item_aug: torch.Tensor | None
    scale: torch.Tensor


class TwoTowerModel(nn.Module):
    """Both towers and the temperature. ``forward(users, items)`` embeds a batch of users and
    a batch of candidate items (any number); scores are ``scale * user @ item.T``."""

    def __init__(self, config: ModelConfig, schema: FeatureSchema) -> None:
        super().__init__()
        self.config = config
        self.schema = schema
        self.item_tower = ItemTower(config, schema)
        self.user_tower = UserTower(config, schema)
        log_scale = torch.tensor(math.log(1.0 / config.temperature))
        if config.learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def embed_users(self, users: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.user_tower(users, self.item_tower.item_embedding)[0]

    def embed_items(self, items: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.item_tower(items)[0]

    def forward(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> TowerOutput:
        user, user_aug = self.user_tower(users, self.item_tower.item_embedding)
        item, item_aug = self.item_tower(items)
        return TowerOutput(user=user, item=item, user_aug=user_aug, item_aug=item_aug, scale=self.scale)
