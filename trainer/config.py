"""Typed, validated configuration of the towers and of one training run (docs/style.md item 2).

``ModelConfig`` describes the towers (it is saved with every model and must match to load
weights); ``TrainConfig`` describes one run (loss, negatives, optimiser, schedule, data).
Both are frozen dataclasses parsed once in ``jobs/train.py``; library code takes them, never
a dict. ``PRESETS`` are the named model variants the README and the benchmarks compare.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

Activation = Literal["relu", "gelu", "silu", "tanh"]
HistoryPooling = Literal["mean", "mean+recent", "attention", "transformer"]
LossKind = Literal["softmax", "bce"]
OptimizerKind = Literal["adam", "adamw", "adagrad", "sgd"]
BackendKind = Literal["auto", "ddp", "horovod", "single"]

EVAL_KS: tuple[int, ...] = (10, 20, 50, 100)


def _check_choice(owner: str, name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_positive(owner: str, obj: Any, names: tuple[str, ...], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{owner}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The towers. Every field embedding has ``field_dim`` (SENet reweights whole fields, so
    they must share a size); the MLP maps the concatenated fields to ``out_dim``, and the
    output is L2-normalised so that a dot product is a cosine.

    ``history_pooling``: how the user tower pools its point-in-time history through the item
    tower's own item-id embedding table: ``mean`` (YouTube-DNN), ``mean+recent`` (mean of all
    plus mean of the ``recent_k`` most recent, as two fields), ``attention`` (one learned
    query attends over the history with position embeddings), ``transformer``
    (``seq_layers`` causal self-attention blocks of ``seq_heads`` heads, dropout
    ``seq_dropout``, over the history with position embeddings; the state at the most recent
    event is the field, plus the history mean as a second field when ``seq_mean_field``).
    ``dat``: Dual Augmented Two-Tower: per-user and per-item augmented vectors (``out_dim``
    wide, so each can mimic the other tower's output) are tower inputs, trained by the
    mimic loss.
    ``temperature``: scores are cosine / temperature; learnable when ``learn_temperature``.
    """

    field_dim: int = 32
    hidden: tuple[int, ...] = (256, 128)
    out_dim: int = 64
    activation: Activation = "relu"
    dropout: float = 0.0
    use_user_id: bool = True
    history_pooling: HistoryPooling = "attention"
    recent_k: int = 5
    seq_layers: int = 2
    seq_heads: int = 2
    seq_dropout: float = 0.1
    seq_mean_field: bool = True
    senet_user: bool = False
    senet_item: bool = False
    senet_reduction: int = 4
    dat: bool = False
    temperature: float = 0.05
    learn_temperature: bool = True
    # Items columns the item tower must not read (features/items.popularity_bucket counts
    # every event up to the build cutoff, valid/test included, so it would leak the future).
    item_exclude: tuple[str, ...] = ("popularity_bucket",)

    def __post_init__(self) -> None:
        _check_positive("ModelConfig", self, ("field_dim", "out_dim", "recent_k", "senet_reduction", "temperature"))
        if not all(isinstance(h, int) and h > 0 for h in self.hidden):
            raise ValueError(f"ModelConfig.hidden must be positive layer widths, got {self.hidden!r}")
        for name in ("dropout", "seq_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        _check_positive("ModelConfig", self, ("seq_layers", "seq_heads"))
        if self.history_pooling == "transformer" and self.field_dim % self.seq_heads:
            raise ValueError(f"ModelConfig.seq_heads ({self.seq_heads}) must divide field_dim ({self.field_dim})")
        _check_choice("ModelConfig", "activation", self.activation, Activation)
        _check_choice("ModelConfig", "history_pooling", self.history_pooling, HistoryPooling)


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Loss ``softmax``: in-batch sampled softmax over the candidates of the global batch (all
    ranks), optionally ``mixed_negatives`` extra uniform items per rank; ``logq`` subtracts
    each candidate's log sampling probability; a candidate equal to the row's positive is
    masked (accidental hit). Loss ``bce``: pointwise on the positive and the offline
    negatives of each pair (``pairs.neg_item_idx``, at most ``max_offline_negatives``).
    ``dat_mimic_weight`` / ``dat_cal_weight``: weights of the DAT mimic loss and the
    category alignment loss (only with ``ModelConfig.dat`` / any model respectively).
    ``lr_decay``: multiplicative decay of the learning rate per epoch.
    ``early_stopping_patience``: stop after this many epochs without a better
    ``early_stopping_metric`` on the validation split (0 = never stop early).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossKind = "softmax"
    logq: bool = True
    mixed_negatives: int = 0
    max_offline_negatives: int = 8
    offline_negative_kinds: tuple[str, ...] = ("random", "popularity", "hard")
    dat_mimic_weight: float = 0.0
    dat_cal_weight: float = 0.0
    optimizer: OptimizerKind = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    lr_decay: float = 0.9
    batch_size: int = 512
    epochs: int = 12
    early_stopping_metric: str = "hr@50"
    early_stopping_patience: int = 3
    eval_ks: tuple[int, ...] = EVAL_KS
    seed: int = 0
    # Petastorm reader threads per rank. Any number keeps each epoch's batch order a pure
    # function of (seed, epoch, rank), which exact resume relies on (trainer/data.py); two read
    # row groups in parallel (loader 0.87x vs 0.73x raw pyarrow rows/s with one, on 2 idle
    # cores: benchmarks/bench_train.py --only loader).
    reader_workers: int = 2
    shuffle_buffer: int = 20_000
    max_steps_per_epoch: int | None = None
    log_every: int = 20
    checkpoint_every_steps: int = 100  # and at every epoch end; 0 = epoch ends only
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        _check_choice("TrainConfig", "loss", self.loss, LossKind)
        _check_choice("TrainConfig", "optimizer", self.optimizer, OptimizerKind)
        _check_positive("TrainConfig", self, ("lr", "batch_size", "epochs", "reader_workers", "log_every"))
        _check_positive("TrainConfig", self, ("keep_checkpoints",))
        _check_positive("TrainConfig", self, ("mixed_negatives", "max_offline_negatives", "weight_decay",
                                              "checkpoint_every_steps",
                                              "dat_mimic_weight", "dat_cal_weight", "early_stopping_patience",
                                              "shuffle_buffer"), allow_zero=True)
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"TrainConfig.lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if not self.eval_ks or any(k <= 0 for k in self.eval_ks):
            raise ValueError(f"TrainConfig.eval_ks must be positive cut-offs, got {self.eval_ks!r}")
        allowed = {f"{m}@{k}" for m in ("hr", "recall", "ndcg") for k in self.eval_ks}
        if self.early_stopping_metric not in allowed:
            raise ValueError(f"TrainConfig.early_stopping_metric must be one of {sorted(allowed)}, "
                             f"got {self.early_stopping_metric!r}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch <= 0:
            raise ValueError(f"TrainConfig.max_steps_per_epoch must be > 0 or None, got {self.max_steps_per_epoch!r}")
        unknown_kinds = sorted(set(self.offline_negative_kinds) - {"random", "popularity", "hard"})
        if unknown_kinds or not self.offline_negative_kinds:
            raise ValueError("TrainConfig.offline_negative_kinds must be a non-empty subset of random, popularity, "
                             f"hard, got {self.offline_negative_kinds!r}")
        if self.loss == "bce" and self.max_offline_negatives == 0:
            raise ValueError("TrainConfig.loss 'bce' needs offline negatives: max_offline_negatives must be > 0")
        if self.dat_mimic_weight > 0 and not self.model.dat:
            raise ValueError("TrainConfig.dat_mimic_weight > 0 needs ModelConfig.dat=True (the augmented vectors)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict`` (JSON lists become tuples); unknown keys are an error."""
        model = _dataclass_from_dict(ModelConfig, data.get("model", {}))
        rest = {k: v for k, v in data.items() if k != "model"}
        return _dataclass_from_dict(cls, rest, model=model)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``{"lr": 0.01, "model.dropout": 0.1}``-style overrides applied and validated."""
        model_changes = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
        own = {k: v for k, v in overrides.items() if not k.startswith("model.")}
        _check_known(ModelConfig, model_changes, "model.")
        _check_known(TrainConfig, own, "")
        model = replace(self.model, **_coerce(ModelConfig, model_changes))
        return replace(self, model=model, **_coerce(TrainConfig, own))


def _check_known(cls: type, changes: dict[str, Any], prefix: str) -> None:
    names = {f.name for f in fields(cls)} - {"model"}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(prefix + u for u in unknown)}; "
                         f"known: {', '.join(prefix + n for n in sorted(names))}")


def _coerce(cls: type, changes: dict[str, Any]) -> dict[str, Any]:
    """JSON/CLI values to the field's type: lists -> tuples (frozen, hashable configs)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}


def _dataclass_from_dict(cls: type, data: dict[str, Any], **extra: Any) -> Any:
    _check_known(cls, {k: v for k, v in data.items() if k != "model"}, "")
    return cls(**_coerce(cls, data), **extra)


# Named variants (``--preset``). The default is the best one measured on MovieLens-100K
# (README, "Training"); the others are the ablations it is compared with.
_BASE_MODEL = ModelConfig()
PRESETS: dict[str, TrainConfig] = {
    # The DSSM setup: pointwise BCE on uniformly sampled (random-kind) offline negatives.
    "dssm-bce": TrainConfig(loss="bce", logq=False, offline_negative_kinds=("random",), model=_BASE_MODEL),
    "dssm-senet-bce": TrainConfig(loss="bce", logq=False, offline_negative_kinds=("random",),
                                  model=replace(_BASE_MODEL, senet_user=True, senet_item=True)),
    "softmax-logq": TrainConfig(loss="softmax", logq=True, model=_BASE_MODEL),
    "softmax-mixed": TrainConfig(loss="softmax", logq=True, mixed_negatives=512, model=_BASE_MODEL),
    "dat": TrainConfig(loss="softmax", logq=True, dat_mimic_weight=0.5, dat_cal_weight=1.0,
                       model=replace(_BASE_MODEL, dat=True)),
    # ``dat`` with the sequential user tower: causal self-attention over the history.
    "transformer": TrainConfig(loss="softmax", logq=True, dat_mimic_weight=0.5, dat_cal_weight=1.0,
                               model=replace(_BASE_MODEL, dat=True, history_pooling="transformer")),
}
DEFAULT_PRESET = "dat"


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
