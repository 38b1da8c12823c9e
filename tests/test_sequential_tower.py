"""The sequential (transformer) history encoder: what its attention may read, and that it
trains, saves and loads like the other encoders.

``hist`` is most recent first and right-padded with 0 (lake_contract/feature_contract.py):
slot 0 is the latest event before the query, slot i the (i+1)-th latest, and every slot
after the last real event is padding. The properties proved here:

* padding never reaches the user vector: neither the content of the padding row of the
  shared item table, nor the position embeddings of padded slots, nor how much trailing
  padding there is;
* causality: the state of slot i depends on slot i and the OLDER events only (slots j > i);
  changing a more recent event (slot j < i, the future from slot i's point of view) leaves
  it unchanged, changing an older real one changes it (the test is not vacuous);
* the query (the state at slot 0, the most recent event) reads the whole history;
* the history gradient reaches exactly the history rows of the item tower's own table;
* a saved model version (weights_only) loads back into the same user and item vectors.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.trainer_fixtures import HIST, NUM_ITEMS, tiny_batch, tiny_schema, tiny_store
from trainer.config import PRESETS, ModelConfig, TrainConfig
from trainer.towers import SequentialHistory, TwoTowerModel

CONFIG = ModelConfig(field_dim=8, hidden=(16,), out_dim=8, history_pooling="transformer", seq_layers=2, seq_heads=2,
                     seq_dropout=0.0)
LENGTHS = [0, 1, 2, 3, 3, HIST]  # one empty history, short ones, one full one


def _model(config: ModelConfig = CONFIG, seed: int = 0) -> TwoTowerModel:
    torch.manual_seed(seed)
    return TwoTowerModel(config, tiny_schema()).eval()


def _users(lengths: list[int] = LENGTHS, seed: int = 1) -> dict[str, torch.Tensor]:
    users = {k: v for k, v in tiny_batch(len(lengths), seed=seed).items() if k != "item_idx"}
    hist = torch.randint(1, NUM_ITEMS, (len(lengths), HIST), generator=torch.Generator().manual_seed(seed))
    for row, n in enumerate(lengths):
        hist[row, n:] = 0  # right padding, as the contract writes it
    users["hist"] = hist
    return users


def _sequence(model: TwoTowerModel) -> SequentialHistory:
    return model.user_tower.history.sequence


@pytest.mark.parametrize("mean_field", [True, False])
def test_padding_never_reaches_the_user_vector(mean_field):
    model = _model(replace(CONFIG, seq_mean_field=mean_field))
    users = _users([0, 1, 2, 3, 3])  # no history longer than 3: slots 3.. are padding in every row
    with torch.no_grad():
        before = model.embed_users(users)
        # (1) whatever the padding row of the shared item table holds
        model.item_tower.item_embedding.weight[0].normal_(std=3.0)
        # (2) whatever the position embeddings of the padded slots hold
        _sequence(model).positions[3:].normal_(std=3.0)
        after = model.embed_users(users)
        assert torch.equal(after, before)
        # (3) however much trailing padding the history carries
        truncated = model.embed_users({**users, "hist": users["hist"][:, :3]})
        torch.testing.assert_close(truncated, before, rtol=1e-6, atol=1e-6)
        # and a real item in a padded slot does change the vector (the checks above are not vacuous)
        filled = users["hist"].clone()
        filled[1, 1] = 7
        assert not torch.allclose(model.embed_users({**users, "hist": filled})[1], before[1])


def test_a_padding_slot_state_is_zero_and_an_empty_history_gives_a_finite_unit_vector():
    model = _model()
    users = _users()
    with torch.no_grad():
        states = _sequence(model).states(users["hist"], model.item_tower.item_embedding)
        vectors = model.embed_users(users)
    padded = users["hist"] == 0
    assert torch.count_nonzero(states[padded]) == 0
    assert torch.count_nonzero(states[~padded].abs().sum(-1)) == int((~padded).sum())
    assert torch.isfinite(vectors).all()
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(LENGTHS)))


def test_each_slot_reads_itself_and_older_events_only():
    """Causal: changing the event at slot j (to another real item) leaves every slot i > j
    (older than it) exactly unchanged and changes every real slot i <= j."""
    model = _model()
    users = _users([HIST, HIST, 4])
    table = model.item_tower.item_embedding
    sequence = _sequence(model)
    with torch.no_grad():
        before = sequence.states(users["hist"], table)
        for j in range(HIST):
            changed = users["hist"].clone()
            changed[:2, j] = changed[:2, j] % (NUM_ITEMS - 1) + 1  # another real item, rows 0 and 1
            after = sequence.states(changed, table)
            assert torch.equal(after[:2, j + 1:], before[:2, j + 1:]), f"an older slot read slot {j}"
            for i in range(j + 1):
                assert not torch.allclose(after[:2, i], before[:2, i]), f"slot {i} did not read slot {j}"
            assert torch.equal(after[2], before[2])  # another row's change never leaks into this one


def test_the_query_is_the_most_recent_slot_and_reads_the_whole_history():
    model = _model(replace(CONFIG, seq_mean_field=False))
    users = _users([HIST, HIST])
    table = model.item_tower.item_embedding
    with torch.no_grad():
        states = _sequence(model).states(users["hist"], table)
        field = model.user_tower.history(users["hist"], table)
        assert len(field) == 1 and torch.equal(field[0], states[:, 0])
        base = model.embed_users(users)
        for j in range(HIST):  # the oldest event too
            changed = users["hist"].clone()
            changed[:, j] = changed[:, j] % (NUM_ITEMS - 1) + 1
            assert not torch.allclose(model.embed_users({**users, "hist": changed}), base), j


def test_the_history_gradient_reaches_exactly_the_history_rows_of_the_shared_table():
    model = _model()
    model.train()
    table = model.item_tower.item_embedding
    assert [name for name, p in model.named_parameters() if p is table.weight] == ["item_tower.item_embedding.weight"]
    users = _users()
    model.embed_users(users).sum().backward()
    touched = torch.nonzero(table.weight.grad.abs().sum(1)).flatten()
    assert torch.equal(touched, torch.unique(users["hist"][users["hist"] > 0]))


def test_dropout_trains_stochastic_and_evaluates_deterministic():
    model = _model(replace(CONFIG, seq_dropout=0.5))
    users = _users()
    model.train()
    assert not torch.allclose(model.embed_users(users), model.embed_users(users))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.embed_users(users), model.embed_users(users))


def test_config_validates_the_transformer_fields():
    with pytest.raises(ValueError, match="seq_heads"):
        ModelConfig(field_dim=30, history_pooling="transformer", seq_heads=4)
    ModelConfig(field_dim=30, history_pooling="attention", seq_heads=4)  # only the transformer splits heads
    for bad in ({"seq_layers": 0}, {"seq_heads": 0}, {"seq_dropout": 1.0}):
        with pytest.raises(ValueError):
            ModelConfig(history_pooling="transformer", **bad)
    assert PRESETS["transformer"].model.history_pooling == "transformer"


def test_a_saved_model_version_loads_back_into_the_same_vectors(tmp_path):
    """jobs.train's way of writing a version (trainer.artifacts), then load_model_dir, which
    reads weights.pt with weights_only=True: same state, same user and item vectors."""
    from trainer.artifacts import StagedModel, load_model_dir

    config = TrainConfig(model=CONFIG)
    model = _model()
    staged = StagedModel.start(str(tmp_path), "seq-v1")
    staged.save_weights({k: v.cpu() for k, v in model.state_dict().items()})
    staged.write_json("config.json", config.to_dict())
    (staged.folder / "schema.json").write_text(tiny_schema().to_json())
    staged.write_json("manifest.json", {"version": "seq-v1", "table_versions": {}})
    loaded = load_model_dir(staged.commit())
    assert loaded.config == config
    assert any(k.startswith("user_tower.history.sequence.blocks.1.") for k in loaded.model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    users = _users()
    idx = torch.arange(1, NUM_ITEMS)
    items = {"item_idx": idx, **tiny_store().features(idx)}
    with torch.no_grad():
        assert torch.equal(loaded.model.embed_users(users), model.embed_users(users))
        assert torch.equal(loaded.model.embed_items(items), model.embed_items(items))
