"""Towers, losses and metrics against hand-computed values (no lake, no processes)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.trainer_fixtures import tiny_batch, tiny_schema, tiny_store
from trainer.config import ModelConfig, TrainConfig, preset
from trainer.item_store import pad_list_array
from trainer.losses import (
    binary_auc,
    candidate_log_q,
    category_alignment_loss,
    mimic_loss,
    sampled_softmax_logits,
)
from trainer.metrics import RankingAccumulator, expected_hit_and_ndcg, rank_counts
from trainer.towers import TwoTowerModel


def test_history_pooling_uses_the_item_towers_own_table():
    model = TwoTowerModel(ModelConfig(), tiny_schema())
    table = model.item_tower.item_embedding
    # the user tower holds no item table of its own: the only item-id embedding is the item tower's
    item_tables = [name for name, p in model.named_parameters() if p is table.weight]
    assert item_tables == ["item_tower.item_embedding.weight"]
    users = {k: v for k, v in tiny_batch(4).items() if k != "item_idx"}
    model.embed_users(users).sum().backward()
    touched = torch.nonzero(table.weight.grad.abs().sum(1)).flatten()
    expected = torch.unique(users["hist"][users["hist"] > 0])
    assert torch.equal(touched, expected)  # history gradient reaches exactly the history rows


def test_padding_rows_stay_zero_and_outputs_are_unit_vectors():
    model = TwoTowerModel(ModelConfig(senet_user=True, senet_item=True, dat=True), tiny_schema())
    store = tiny_store()
    idx = torch.arange(1, 10)
    items = model.embed_items({"item_idx": idx, **store.features(idx)})
    users = model.embed_users({k: v for k, v in tiny_batch(5).items() if k != "item_idx"})
    torch.testing.assert_close(items.norm(dim=1), torch.ones(9))
    torch.testing.assert_close(users.norm(dim=1), torch.ones(5))
    assert torch.count_nonzero(model.item_tower.item_embedding.weight[0]) == 0


def test_logq_corrected_logits_and_accidental_hits_match_hand_computation():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cand = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    positive_index = torch.tensor([0, 1])
    positive_item = torch.tensor([7, 8])
    candidate_item = torch.tensor([7, 8, 7])  # column 2 is item 7 again: an accidental hit for row 0
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.5]))
    logits = sampled_softmax_logits(user, cand, scale, positive_index, positive_item, candidate_item, log_q)
    low = torch.finfo(torch.float32).min
    expected = torch.tensor([
        [2 * 1.0 - math.log(0.5), 2 * 0.6 - math.log(0.25), low],
        [2 * 0.0 - math.log(0.5), 2 * 0.8 - math.log(0.25), 2 * 1.0 - math.log(0.5)],
    ])
    torch.testing.assert_close(logits, expected)


def test_candidate_log_q_with_uniform_mixture():
    log_q = torch.log(torch.tensor([0.1, 0.01]))
    got = candidate_log_q(log_q, in_batch=100, uniform=50, num_items=1000)
    torch.testing.assert_close(got, torch.log(torch.tensor([100 * 0.1 + 0.05, 100 * 0.01 + 0.05])))
    # without uniform draws it is log_q shifted by a constant (the softmax ignores it)
    shifted = candidate_log_q(log_q, in_batch=100, uniform=0, num_items=1000)
    torch.testing.assert_close(shifted - log_q, torch.full((2,), math.log(100.0)))


def test_mimic_loss_sends_no_gradient_into_its_targets():
    user_aug = torch.randn(4, 3, requires_grad=True)
    item_aug = torch.randn(4, 3, requires_grad=True)
    user = torch.randn(4, 3, requires_grad=True)
    item = torch.randn(4, 3, requires_grad=True)
    loss = mimic_loss(user_aug, item_aug, user, item)
    loss.backward()
    assert user.grad is None and item.grad is None
    torch.testing.assert_close(user_aug.grad, 2 * (user_aug - item).detach() / 4)
    torch.testing.assert_close(item_aug.grad, 2 * (item_aug - user).detach() / 4)


def test_category_alignment_loss_equals_a_loop_reference():
    g = torch.Generator().manual_seed(3)
    item = torch.randn(12, 3, generator=g)
    category = torch.tensor([2, 2, 2, 2, 2, 5, 5, 5, 9, 9, 4, 5])  # 2 is major; 4 has one item (skipped)

    def cov(x):
        m = x.mean(0, keepdim=True)
        return (x - m).T @ (x - m) / x.shape[0]

    major = cov(item[category == 2])
    expected = sum(((cov(item[category == c]) - major) ** 2).sum() for c in (5, 9))
    torch.testing.assert_close(category_alignment_loss(item, category), expected)
    assert category_alignment_loss(item[:5], category[:5]).item() == 0.0  # one category only


def test_binary_auc_matches_pairwise_count_with_ties():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1, 0.5, 0.3])
    labels = torch.tensor([1, 1, 0, 0, 0, 1])
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert binary_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))


def test_evaluator_gives_exact_hr_and_ndcg_on_a_hand_made_example():
    # 3 users x 6 items (item 0 = padding, excluded)
    scores = torch.tensor([
        [9.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 3: items 1, 2 score higher -> rank 2 (0-based)
        [9.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 4, item 1 and 2 seen -> only 3 higher -> rank 1
        [0.0, 1.0, 1.0, 1.0, 1.0, 0.5],  # target 2 ties with 1, 3, 4 -> position uniform over 0..3
    ])
    targets = torch.tensor([3, 4, 2])
    seen_rows, seen_items = torch.tensor([1, 1, 1]), torch.tensor([1, 2, 4])  # row 1's target 4 stays
    excluded = torch.tensor([True, False, False, False, False, False])
    greater, ties = rank_counts(scores.clone(), targets, seen_rows, seen_items, excluded)
    assert greater.tolist() == [2, 1, 0] and ties.tolist() == [0, 0, 3]
    acc = RankingAccumulator([1, 2, 3])
    acc.add(greater, ties)
    r = acc.result()
    assert r["hr@1"] == pytest.approx((0 + 0 + 1 / 4) / 3)
    assert r["hr@2"] == pytest.approx((0 + 1 + 2 / 4) / 3)
    assert r["hr@3"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    d = [1 / math.log2(p + 2) for p in range(4)]
    assert r["ndcg@2"] == pytest.approx((0 + d[1] + (d[0] + d[1]) / 4) / 3)
    assert r["ndcg@3"] == pytest.approx((d[2] + d[1] + (d[0] + d[1] + d[2]) / 4) / 3)
    assert r["recall@3"] == r["hr@3"]
    hit, ndcg = expected_hit_and_ndcg(torch.tensor([5]), torch.tensor([0]), 3)
    assert hit.item() == 0.0 and ndcg.item() == 0.0


def test_pad_list_array_truncates_pads_and_handles_nulls():
    arr = pa.array([[1, 2, 3], [], None, [4, 5, 6, 7, 8], [9]], pa.list_(pa.int32()))
    expected = np.array([[1, 2, 3, 0], [0, 0, 0, 0], [0, 0, 0, 0], [4, 5, 6, 7], [9, 0, 0, 0]])
    np.testing.assert_array_equal(pad_list_array(arr, 4), expected)
    np.testing.assert_array_equal(pad_list_array(arr.slice(3), 2), np.array([[4, 5], [9, 0]]))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"TrainConfig\.loss must be one of 'softmax', 'bce', got 'hinge'"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        preset("softmax-logq").with_overrides({"model.nope": 1})
    with pytest.raises(ValueError, match=r"needs ModelConfig\.dat=True"):
        TrainConfig(dat_mimic_weight=1.0)
    cfg = preset("dat").with_overrides({"model.hidden": [64], "lr": 0.01})
    assert cfg.model.hidden == (64,) and cfg.lr == 0.01
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_offline_negatives_keep_the_asked_kinds_and_pad():
    from trainer.data import _offline_negatives

    table = pa.table({
        "user_idx": pa.array([1, 2, 3], pa.int32()),
        "neg_item_idx": pa.array([[5, 6, 7], [], [8, 9, 10, 11]], pa.list_(pa.int32())),
        "neg_kind": pa.array([["random", "hard", "random"], [], ["popularity", "random", "random", "random"]],
                             pa.list_(pa.string())),
    })
    np.testing.assert_array_equal(_offline_negatives(table, 2, ("random",)), [[5, 7], [0, 0], [9, 10]])
    np.testing.assert_array_equal(_offline_negatives(table, 3, None), [[5, 6, 7], [0, 0, 0], [8, 9, 10]])
    np.testing.assert_array_equal(_offline_negatives(table.slice(1), 3, ("popularity", "hard")),
                                  [[0, 0, 0], [8, 0, 0]])  # a slice of a row group keeps its own rows


def test_staging_left_by_a_killed_run_is_removed_but_a_live_one_is_kept(tmp_path):
    import json
    import os
    import socket

    from trainer.artifacts import StagedModel

    killed = StagedModel.start(str(tmp_path), "v1")  # as if its process died before commit
    models = killed.folder.parent
    dead = models / ".staging-other-dead"
    dead.mkdir()
    (dead / ".owner").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))
    live = models / ".staging-other-live"
    live.mkdir()
    (live / ".owner").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    again = StagedModel.start(str(tmp_path), "v1")  # the re-run of the same version
    assert not killed.folder.exists() and not dead.exists() and live.exists()
    path = again.commit()
    assert path == models / "v1" and not (path / ".owner").exists()


def _save_feature_settings(lake_root, config) -> int:
    """One full build's features/config row, written as the build writes it (one new version)."""
    from datetime import UTC, datetime

    from deltalake import write_deltalake

    from lake_contract.delta_snapshot import table_version

    row = pa.table({"config_json": [config.to_json()], "as_of": [datetime(2026, 1, 2, tzinfo=UTC)]})
    write_deltalake(str(lake_root / "features" / "config"), row, mode="overwrite")
    return table_version(str(lake_root / "features" / "config"))


def test_a_finetune_is_refused_when_its_pairs_have_other_feature_settings_than_its_parent(tmp_path):
    from lake_contract.errors import TableNotFoundError, TowerlakeError
    from lake_contract.feature_config import FeatureConfig, FeatureConfigMismatchError
    from trainer.finetune import check_feature_settings

    with pytest.raises(TableNotFoundError, match="the fine-tune of p1 needs the feature settings of a full build"):
        check_feature_settings(str(tmp_path), "p1", {"table_versions": {}})
    first = _save_feature_settings(tmp_path, FeatureConfig(prefix_columns={"users.zip_code": 3}))
    parent = {"table_versions": {"features/config": first, "pairs/train": 4}}
    check_feature_settings(str(tmp_path), "p1", parent)  # same version: nothing to compare
    same = _save_feature_settings(tmp_path, FeatureConfig(prefix_columns={"users.zip_code": 3}))
    assert same == first + 1
    check_feature_settings(str(tmp_path), "p1", parent)  # a later build with equal settings is fine
    _save_feature_settings(tmp_path, FeatureConfig(prefix_columns={"users.zip_code": 3}, history_length=20,
                                                   label_min_rating=4.0))
    with pytest.raises(FeatureConfigMismatchError) as err:
        check_feature_settings(str(tmp_path), "p1", parent)
    assert isinstance(err.value, TowerlakeError)
    assert str(err.value).startswith(
        "the fine-tune of p1 uses feature settings that differ from the full build's (features/config v0) in 2 "
        "field(s): history_length (saved 50, the fine-tune of p1 20), label_min_rating (saved None, the fine-tune "
        "of p1 4.0).")
    assert "the parent was trained on pairs of features/config v0, the window's pairs come from v2" in str(err.value)
    with pytest.raises(FeatureConfigMismatchError, match="parent model p0 records no feature settings"):
        check_feature_settings(str(tmp_path), "p0", {"table_versions": {"pairs/train": 1}})


def test_one_gather_of_positives_and_extras_is_reordered_to_all_positives_then_all_extras():
    from trainer.task import _positives_first

    # 2 ranks, 3 positives + 2 extras each, as one rank-major all-gather returns them
    gathered = torch.tensor([10, 11, 12, 50, 51, 20, 21, 22, 60, 61])
    assert _positives_first(gathered, 2, 3).tolist() == [10, 11, 12, 20, 21, 22, 50, 51, 60, 61]
    vectors = gathered.float().unsqueeze(1).repeat(1, 4)  # (10, d): rows move whole
    assert torch.equal(_positives_first(vectors, 2, 3)[:, 0], _positives_first(gathered, 2, 3).float())
    assert _positives_first(gathered[:6], 2, 3).tolist() == [10, 11, 12, 50, 51, 20]  # no extras: as gathered
