"""Growing a trained model to bigger vocabularies (the hourly fine-tune's warm start)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.trainer_fixtures import NUM_ITEMS, NUM_USERS, tiny_batch, tiny_schema, tiny_store
from trainer.config import ModelConfig
from trainer.feature_schema import FieldSpec
from trainer.growth import describe_growth, grow_model
from trainer.towers import EMBEDDING_INIT_STD, TwoTowerModel

GROW = 2000
CONFIG = ModelConfig(field_dim=16, hidden=(32,), out_dim=16, dat=True, senet_user=True, senet_item=True,
                     history_pooling="attention")


def bigger_schema(extra: int = GROW):
    small = tiny_schema()
    return replace(small, num_users=small.num_users + extra, num_items=small.num_items + extra,
                   user_fields=tuple(replace(f, size=f.size + extra) for f in small.user_fields),
                   item_fields=tuple(replace(f, size=f.size + extra) for f in small.item_fields))


def trained_parent(config: ModelConfig = CONFIG) -> TwoTowerModel:
    """A parent whose weights are not a fresh init (one SGD step on random data)."""
    torch.manual_seed(0)
    model = TwoTowerModel(config, tiny_schema())
    batch = tiny_batch(8, seed=1)
    idx = batch["item_idx"]
    out = model({k: v for k, v in batch.items() if k != "item_idx"}, {"item_idx": idx, **tiny_store().features(idx)})
    loss = -(out.user * out.item).sum() + out.user_aug.square().sum() + out.item_aug.square().sum()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.zero_grad()
    return model


EMBEDDINGS = {
    "item_tower.item_embedding.weight", "item_tower.augmented.weight", "user_tower.augmented.weight",
    "user_tower.user_embedding.weight", "item_tower.fields.tables.genres_idx.weight",
    "item_tower.fields.tables.year_bucket.weight", "user_tower.fields.tables.gender_idx.weight",
    "user_tower.fields.tables.age_bucket.weight",
}


def test_old_rows_are_copied_exactly_and_new_rows_are_fresh_init():
    parent = trained_parent()
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = grow_model(parent, bigger_schema(), seed=3)
    old, new = parent.state_dict(), child.state_dict()
    grown = {k for k in new if new[k].shape != old[k].shape}
    assert grown == EMBEDDINGS  # id tables (incl. the shared item table), DAT vectors, every field table
    for key in grown:
        rows = old[key].shape[0]
        assert new[key].shape == (rows + GROW, old[key].shape[1])
        assert torch.equal(new[key][:rows], old[key]), key
        assert torch.count_nonzero(new[key][0]) == 0, key  # padding row
        fresh = new[key][rows:]
        assert torch.count_nonzero(fresh) == fresh.numel(), key
        assert abs(fresh.mean().item()) < 0.01 and abs(fresh.std().item() - EMBEDDING_INIT_STD) < 0.005, key
    for key in new.keys() - grown:  # MLPs, SENet, attention query/positions, temperature
        assert torch.equal(new[key], old[key]), key
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items())  # parent untouched
    # the history pooling still reads the item tower's own (grown) table, and nothing is shared with the parent
    assert [n for n, p in child.named_parameters() if p is child.item_tower.item_embedding.weight] == [
        "item_tower.item_embedding.weight"]
    assert not {p.data_ptr() for p in parent.parameters()} & {p.data_ptr() for p in child.parameters()}
    assert all(p.requires_grad for p in child.parameters()) and child.schema == bigger_schema()


def test_grown_model_scores_old_ids_exactly_like_the_parent():
    parent = trained_parent().eval()
    child = grow_model(parent, bigger_schema()).eval()
    batch = tiny_batch(7, seed=5)
    users = {k: v for k, v in batch.items() if k != "item_idx"}
    idx = torch.arange(NUM_ITEMS)
    items = {"item_idx": idx, **tiny_store().features(idx)}
    with torch.no_grad():
        assert torch.equal(child.embed_users(users), parent.embed_users(users))
        assert torch.equal(child.embed_items(items), parent.embed_items(items))
        assert torch.equal(child.scale, parent.scale)


def test_new_ids_get_finite_unit_vectors_and_gradients():
    child = grow_model(trained_parent(), bigger_schema())
    new_item = torch.tensor([NUM_ITEMS + 5, NUM_ITEMS + GROW - 1])
    features = {"genres_idx": torch.tensor([[1, 4 + GROW] + [0] * 14, [0] * 16]),  # a new genre index too
                "year_bucket": torch.tensor([2, 3 + GROW])}
    vec = child.embed_items({"item_idx": new_item, **features})
    assert torch.isfinite(vec).all()
    torch.testing.assert_close(vec.norm(dim=1), torch.ones(2))
    batch = tiny_batch(2, seed=2)
    users = {k: v for k, v in batch.items() if k != "item_idx"}
    users["user_idx"] = torch.tensor([NUM_USERS, NUM_USERS + GROW - 1])
    users["hist"][0, 0] = NUM_ITEMS + 5  # a new item in a history goes through the shared table
    user_vec = child.embed_users(users)
    torch.testing.assert_close(user_vec.norm(dim=1), torch.ones(2))
    (user_vec.sum() + vec.sum()).backward()
    assert child.item_tower.item_embedding.weight.grad[NUM_ITEMS + 5].abs().sum() > 0
    assert child.user_tower.user_embedding.weight.grad[NUM_USERS + GROW - 1].abs().sum() > 0


def test_same_seed_same_new_rows_and_no_global_rng_use():
    parent = trained_parent()
    state = torch.get_rng_state()
    a = grow_model(parent, bigger_schema(), seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = grow_model(parent, bigger_schema(), seed=7).state_dict()
    c = grow_model(parent, bigger_schema(), seed=8).state_dict()
    key = "item_tower.item_embedding.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key][NUM_ITEMS:], c[key][NUM_ITEMS:])
    assert torch.equal(a[key][:NUM_ITEMS], c[key][:NUM_ITEMS])


def test_unchanged_schema_gives_an_identical_copy():
    parent = trained_parent()
    child = grow_model(parent, tiny_schema())
    assert all(torch.equal(child.state_dict()[k], v) for k, v in parent.state_dict().items())


@pytest.mark.parametrize(("change", "named"), [
    (lambda s: replace(s, item_fields=(FieldSpec("genres_idx", "multi_valued", 4), s.item_fields[1])), "genres_idx"),
    (lambda s: replace(s, num_items=s.num_items - 1), "items 30->29"),
    (lambda s: replace(s, user_fields=(*s.user_fields, FieldSpec("zip_idx", "categorical", 9))), "zip_idx"),
    (lambda s: replace(s, user_fields=s.user_fields[:1]), "age_bucket"),
    (lambda s: replace(s, user_fields=(FieldSpec("gender_idx", "bucket", 3), s.user_fields[1])), "gender_idx"),
    (lambda s: replace(s, user_fields=s.user_fields[::-1]), "gender_idx"),
    (lambda s: replace(s, user_fields=s.user_fields[:1], item_fields=(*s.item_fields, s.user_fields[1])),
     "age_bucket"),
    (lambda s: replace(s, history_length=s.history_length + 2), "history_length 6 -> 8"),
])
def test_anything_but_row_growth_is_refused(change, named):
    parent = trained_parent()
    with pytest.raises(ValueError, match="--mode full") as err:
        grow_model(parent, change(tiny_schema()))
    assert named in str(err.value)


def test_history_length_only_matters_for_attention():
    parent = trained_parent(replace(CONFIG, history_pooling="mean+recent"))
    child = grow_model(parent, replace(bigger_schema(), history_length=9))
    assert child.schema.history_length == 9


def test_describe_growth():
    described = describe_growth(tiny_schema(), bigger_schema(5))
    assert described["users"] == (NUM_USERS, NUM_USERS + 5) and described["items"] == (NUM_ITEMS, NUM_ITEMS + 5)
    assert described["categories"] == (4, 4)
    assert described["fields"] == {"age_bucket": (6, 11), "gender_idx": (3, 8), "genres_idx": (5, 10),
                                   "year_bucket": (4, 9)}
    assert described["grown"] == ["users", "items", "age_bucket", "gender_idx", "genres_idx", "year_bucket"]
    assert describe_growth(tiny_schema(), tiny_schema())["grown"] == []
