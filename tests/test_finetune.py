"""The hourly fine-tune (jobs.train --mode finetune) on a lake of its own.

The lake starts as a COPY of the session's MovieLens-100K lake (bronze, vocabularies,
features and pairs of the full build; the shared ml_lake itself is never written: ingesting
and building ML-100K again took ~400 s on this loaded 2-core machine). A short full training
gives the parent, published as the CURRENT release. Then the hour after the data's last
event arrives through the ingest path (the MovieLens mapping over copies of its files with a
NEW user, with a new occupation and zip code, and a NEW item added, and that hour's events,
ingested with --date), the incremental build writes its window of pairs/incremental, and the
fine-tune starts from CURRENT.
"""

from __future__ import annotations

import contextlib
import io as stdio
import json
import shutil
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(900)]

HOUR = datetime(1998, 4, 23, 10, tzinfo=UTC)  # MovieLens-100K ends 1998-04-22 23:10:38 UTC
WINDOW = "1998-04-23T10"
EMPTY_WINDOW = "1998-04-23T11"
NEW_USER, NEW_ITEM = "9001", "9001"
OLD_ITEMS_OF_NEW_USER = ("50", "100", "181", "258", "286")
OLD_USERS = ("1", "13", "92", "234", "276", "405", "450", "655")  # each rates the new item and 3 old ones
OLD_ITEMS = ("1", "7", "56", "98", "121", "127", "174", "222")
HOUR_PAIRS = len(OLD_ITEMS_OF_NEW_USER) + 1 + 4 * len(OLD_USERS)  # every event is a positive (no rating cut)
HR_TOLERANCE = 0.02  # absolute test HR@50 the child may lose against its parent (one SE is ~0.016)


def _run_train(argv: list[str]) -> tuple[int, str, float]:
    """jobs.train.main in this process (the shared Spark JVM is idle meanwhile): exit code,
    stdout, wall seconds."""
    from jobs import train as train_job

    out = stdio.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out):
        code = train_job.main(argv)
    return code, out.getvalue(), time.monotonic() - started


def _hour_source(folder: Path):
    """The MovieLens mapping over copies of its users/items files with one new user and item
    added, and a file of the new hour's events only (their date is a new partition)."""
    from spark_features.sources import movielens_100k_dir, movielens_100k_spec

    ml = movielens_100k_dir()
    folder.mkdir(parents=True, exist_ok=True)
    users = (ml / "ml-100k.user").read_text().rstrip("\n") + f"\n{NEW_USER}\t31\tF\tastronaut\tZZ901\n"
    items = (ml / "ml-100k.item").read_text().rstrip("\n") + f"\n{NEW_ITEM}\tBrand New Film\t1998\tDrama Sci-Fi\n"
    header = (ml / "ml-100k.inter").read_text().splitlines()[0]
    base = HOUR.timestamp()
    events = [(NEW_USER, item, 5, 60 + 60 * k) for k, item in enumerate(OLD_ITEMS_OF_NEW_USER)]
    events.append((NEW_USER, NEW_ITEM, 4, 900))
    for k, user in enumerate(OLD_USERS):
        olds = [OLD_ITEMS[(k + j) % len(OLD_ITEMS)] for j in range(3)]
        events += [(user, item, 4, 1200 + 240 * k + 30 * j) for j, item in enumerate([*olds, NEW_ITEM])]
    (folder / "users.tsv").write_text(users)
    (folder / "items.tsv").write_text(items)
    (folder / "inter.tsv").write_text("\n".join([header, *(f"{u}\t{i}\t{r}\t{base + t:.0f}" for u, i, r, t in events)])
                                      + "\n")
    spec = movielens_100k_spec()
    return replace(spec, name="hour", interactions=replace(spec.interactions, path=str(folder / "inter.tsv")),
                   users=replace(spec.users, path=str(folder / "users.tsv")),
                   items=replace(spec.items, path=str(folder / "items.tsv")))


@pytest.fixture(scope="module")
def scenario(spark, ml_lake, tmp_path_factory):
    from index_builder.release import publish_release
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.incremental import build_incremental
    from spark_features.ingest import IngestOptions, ingest, read_source

    _, shared, _ = ml_lake
    work = tmp_path_factory.mktemp("finetune")
    root = work / "lake"
    for table in ("bronze", "vocab", "features", "pairs"):  # Delta tables: self-contained folders
        shutil.copytree(Path(shared.root.removeprefix("file://")) / table, root / table)
    lake = Lake(str(root))
    io = DeltaLakeIO(spark)
    quiet = lambda _s: None  # noqa: E731
    timings = {}
    code, _, timings["full training (2 x 40 steps)"] = _run_train(
        ["--lake", lake.root, "--epochs", "2", "--no-progress", "--version", "parent",
         "--set", "max_steps_per_epoch=40", "--set", "early_stopping_patience=0"])
    assert code == 0
    publish_release(lake.root, "r1", {"model": root / "models" / "parent"}, {"model_version": "parent"})

    started = time.monotonic()
    hour = _hour_source(work / "hour")
    ingest(spark, io, lake, read_source(spark, hour), hour,
           IngestOptions(batch="hour-1998-04-23", only_date=date(1998, 4, 23)), say=quiet)
    timings["hour ingest"] = time.monotonic() - started
    started = time.monotonic()
    features = FeatureConfig(prefix_columns={"users.zip_code": 3})  # as the ml_lake full build
    report = build_incremental(spark, io, lake, features, HOUR, HOUR + timedelta(hours=1), WINDOW, say=quiet)
    timings["incremental build (one hour)"] = time.monotonic() - started
    empty = build_incremental(spark, io, lake, features, HOUR + timedelta(hours=1), HOUR + timedelta(hours=2),
                              EMPTY_WINDOW, say=quiet)
    assert (report.new_users, report.new_items, report.pairs) == (1, 1, HOUR_PAIRS)
    assert empty.events == 0

    code, child_out, timings["fine-tune (one hour)"] = _run_train(
        ["--lake", lake.root, "--mode", "finetune", "--window", WINDOW, "--version", "child", "--no-progress"])
    assert code == 0, child_out[-3000:]
    code, all_out, timings["fine-tune, --trainable all"] = _run_train(
        ["--lake", lake.root, "--mode", "finetune", "--window", WINDOW, "--version", "child-all", "--no-progress",
         "--trainable", "all"])
    assert code == 0, all_out[-3000:]
    print("\n" + "\n".join(f"  {k}: {v:.1f}s" for k, v in timings.items()))
    return {"lake": lake, "root": root, "stdout": child_out, "timings": timings}


def _load(root: Path, version: str):
    from trainer.artifacts import load_model_dir

    return load_model_dir(root / "models" / version)


def _index_of(root: Path, vocab: str, value: str) -> int:
    from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot
    from lake_contract.lake import Lake

    table = read_snapshot_arrow(resolve_snapshot(Lake(str(root)).table(f"vocab/{vocab}")), ["value", "index"])
    found = dict(zip(table.column("value").to_pylist(), table.column("index").to_pylist(), strict=True))
    return int(found[value])


def test_manifest_links_parent_to_child_with_the_window_and_growth(scenario):
    manifest = json.loads((scenario["root"] / "models" / "child" / "manifest.json").read_text())
    assert manifest["kind"] == "finetune" and manifest["parent"] == "parent" and manifest["window"] == WINDOW
    assert manifest["parent_source"] == "release r1" and manifest["replay_windows"] == []
    assert manifest["trainable"] == "embeddings" and "user_tower.mlp.0.weight" in manifest["frozen"]
    assert manifest["train_rows"] == {WINDOW: HOUR_PAIRS}
    parent, child = _load(scenario["root"], "parent"), _load(scenario["root"], "child")
    growth = manifest["growth"]
    assert growth["users"] == [parent.schema.num_users, parent.schema.num_users + 1] == [944, 945]
    assert growth["items"] == [parent.schema.num_items, parent.schema.num_items + 1] == [1683, 1684]
    # the new user's new occupation and zip code grew those tables too
    assert {"users", "items", "occupation_idx", "zip_code_idx", "zip_code_prefix_idx"} <= set(growth["grown"])
    assert manifest["table_versions"]["pairs/incremental"] >= 0 and "pairs/train" not in manifest["table_versions"]
    assert json.loads((scenario["root"] / "models" / "child" / "config.json").read_text())["epochs"] == 1
    assert (child.schema.num_users, child.schema.num_items) == (945, 1684)
    child_state = child.model.state_dict()
    assert child_state["user_tower.user_embedding.weight"].shape[0] == 945
    assert child_state["item_tower.item_embedding.weight"].shape[0] == 1684
    assert f"batch size 512 -> {HOUR_PAIRS} per rank" in scenario["stdout"]
    assert not [p for p in (scenario["root"] / "models").iterdir() if p.name.startswith(".staging")]
    assert not any((scenario["root"] / "checkpoints").glob("*/step-*.pt"))


def test_growth_keeps_every_old_row_and_untouched_rows_survive_the_fine_tune(scenario):
    from trainer.growth import grow_model

    parent, child = _load(scenario["root"], "parent"), _load(scenario["root"], "child")
    grown = grow_model(parent.model, child.schema, seed=child.config.seed)  # what the job trained from
    old, new = parent.model.state_dict(), grown.state_dict()
    assert new.keys() == child.model.state_dict().keys()
    for key, before in old.items():
        after = new[key]
        assert after.shape == child.model.state_dict()[key].shape, key
        assert torch.equal(after[: before.shape[0]] if before.dim() else after, before), f"{key} changed in growth"
    # Adam moves nothing without a gradient: the users the hour never touched keep their
    # parent rows bit for bit through the fine-tune as well.
    touched = {_index_of(scenario["root"], "user_id", u) for u in (NEW_USER, *OLD_USERS)}
    untouched = torch.tensor(sorted(set(range(1, 944)) - touched))
    assert torch.equal(child.model.state_dict()["user_tower.user_embedding.weight"][untouched],
                       old["user_tower.user_embedding.weight"][untouched])
    # --trainable embeddings (the default): everything outside the embedding tables is the parent's
    frozen = json.loads((scenario["root"] / "models" / "child" / "manifest.json").read_text())["frozen"]
    assert "log_scale" in frozen and "item_tower.mlp.4.bias" in frozen
    for name in frozen:
        assert torch.equal(child.model.state_dict()[name], old[name]), name
    moved = child.model.state_dict()["user_tower.user_embedding.weight"][sorted(touched)]
    assert not torch.equal(moved, new["user_tower.user_embedding.weight"][sorted(touched)])


def _user_batch(root: Path, schema, user_idx: int) -> dict[str, torch.Tensor]:
    """The new user's last pair of the window (its history is the hour's earlier events) as
    user-tower input."""
    import pyarrow.compute as pc

    from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot
    from lake_contract.lake import Lake
    from trainer.data import user_columns
    from trainer.feature_schema import MULTI_VALUED_WIDTH
    from trainer.item_store import pad_list_array

    pairs = read_snapshot_arrow(resolve_snapshot(Lake(str(root)).table("pairs/incremental")))
    rows = pairs.filter(pc.equal(pairs.column("user_idx"), user_idx)).sort_by([("event_ts", "descending")]).slice(0, 1)
    assert rows.num_rows == 1 and rows.column("hist_len")[0].as_py() == 5
    batch = {}
    for name in user_columns(schema):
        spec = next((f for f in schema.user_fields if f.name == name), None)
        if name == "hist":
            batch[name] = torch.from_numpy(pad_list_array(rows.column(name), schema.history_length))
        elif spec is not None and spec.kind == "multi_valued":
            batch[name] = torch.from_numpy(pad_list_array(rows.column(name), MULTI_VALUED_WIDTH))
        else:
            batch[name] = torch.tensor(rows.column(name).fill_null(0).to_pylist(), dtype=torch.int64)
    return batch


def test_new_user_and_new_item_are_embedded_and_retrievable(scenario):
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.lake import Lake
    from trainer.growth import grow_model
    from trainer.item_store import load_item_store

    root = scenario["root"]
    parent, child = _load(root, "parent"), _load(root, "child")
    store = load_item_store(resolve_snapshot(Lake(str(root)).table("features/items")), child.schema)
    new_item, new_user = _index_of(root, "item_id", NEW_ITEM), _index_of(root, "user_id", NEW_USER)
    assert new_item == 1683 and new_user == 944 and bool(store.valid[new_item])
    catalog = torch.from_numpy(np.flatnonzero(store.valid.numpy()))
    user_batch = _user_batch(root, child.schema, new_user)
    grown = grow_model(parent.model, child.schema, seed=child.config.seed).eval()  # the model before the step

    def rank_of_new_item(model) -> tuple[int, float, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            items = model.embed_items({"item_idx": catalog, **store.features(catalog)})
            user = model.embed_users(user_batch)
        scores = (user @ items.T)[0]
        mine = scores[catalog == new_item]
        return int((scores > mine).sum()) + 1, float(mine), items, user

    rank, score, items, user = rank_of_new_item(child.model)
    assert torch.isfinite(items).all() and torch.isfinite(user).all()
    assert torch.allclose(items.norm(dim=1), torch.ones(len(catalog)), atol=1e-5)
    # the new item's id row was trained, not left at its fresh draw
    table = "item_tower.item_embedding.weight"
    assert not torch.equal(child.model.state_dict()[table][new_item], grown.state_dict()[table][new_item])
    top = catalog[(user @ items.T)[0].topk(10).indices]
    assert len(set(top.tolist())) == 10  # the new user gets recommendations from the whole catalog
    # One step on 38 pairs moves the new item's rank for the new user only a little (up in 5 of 6
    # parents of different seeds, measured): reported, not asserted.
    rank_before, score_before, _, _ = rank_of_new_item(grown)
    print(f"\n  the new item ranks {rank} of {len(catalog)} for the new user who rated it (cosine {score:.3f}; "
          f"grown parent before the fine-tune: rank {rank_before}, cosine {score_before:.3f})")


def test_test_hr50_of_the_child_stays_within_tolerance_of_the_parent(scenario):
    root = scenario["root"]
    parent = json.loads((root / "models" / "parent" / "metrics.json").read_text())["test"]["model"]
    child = json.loads((root / "models" / "child" / "metrics.json").read_text())["test"]["model"]
    everything = json.loads((root / "models" / "child-all" / "metrics.json").read_text())["test"]["model"]
    print(f"\n  test HR@50 parent {parent['hr@50']:.4f} -> child {child['hr@50']:.4f} (tolerance {HR_TOLERANCE}; "
          f"--trainable all: {everything['hr@50']:.4f}); timings: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in scenario["timings"].items()))
    assert parent["rows"] == child["rows"] > 900
    assert child["hr@50"] >= parent["hr@50"] - HR_TOLERANCE


def test_a_window_without_pairs_exits_zero_and_writes_no_version(scenario):
    models = scenario["root"] / "models"
    before = sorted(p.name for p in models.iterdir())
    code, out, _ = _run_train(["--lake", scenario["lake"].root, "--mode", "finetune", "--window", EMPTY_WINDOW,
                               "--no-progress"])
    assert code == 0
    assert f"window {EMPTY_WINDOW} has no pairs: nothing to fine-tune; no model version written" in out
    assert sorted(p.name for p in models.iterdir()) == before


def test_clear_failures_write_nothing(scenario):
    from lake_contract.errors import BadInputError
    from trainer.artifacts import ModelNotFoundError
    from trainer.config import TrainConfig
    from trainer.feature_schema import FeatureSchema
    from trainer.towers import TwoTowerModel

    root, lake_root = scenario["root"], scenario["lake"].root
    models = root / "models"
    before = sorted(p.name for p in models.iterdir())
    finetune = ["--lake", lake_root, "--mode", "finetune", "--window", WINDOW, "--no-progress"]
    with pytest.raises(BadInputError, match=r"window 1998-04-23T12 has not been built.*--mode incremental"):
        _run_train([*finetune[:4], "--window", "1998-04-23T12"])
    with pytest.raises(ModelNotFoundError, match="no model version 'nope'"):
        _run_train([*finetune, "--parent", "nope"])
    with pytest.raises(ValueError, match=r"keeps the parent's towers.*model\.out_dim.*--mode full"):
        _run_train([*finetune, "--set", "model.out_dim=8"])
    # a parent with MORE users than the lake's vocabulary: the vocabulary shrank
    child = models / "child"
    big = models / "big"
    shutil.copytree(child, big)
    schema = FeatureSchema.from_json((child / "schema.json").read_text())
    schema = replace(schema, num_users=schema.num_users + 5)
    config = TrainConfig.from_dict(json.loads((child / "config.json").read_text()))
    (big / "schema.json").write_text(schema.to_json())
    torch.save(TwoTowerModel(config.model, schema).state_dict(), big / "weights.pt")
    with pytest.raises(ValueError, match=r"cannot grow the model: vocabularies shrank.*--mode full"):
        _run_train([*finetune, "--parent", "big"])
    shutil.rmtree(big)
    assert sorted(p.name for p in models.iterdir()) == before


def test_the_parent_comes_from_the_release_copy_when_models_lost_it(scenario):
    from index_builder.release import current_release
    from trainer.finetune import resolve_parent

    release = current_release(scenario["lake"].root)
    pruned = replace(release, manifest={**release.manifest, "model_version": "pruned-long-ago"})
    parent = resolve_parent(scenario["lake"].root, None, pruned)
    assert parent.version == "parent" and parent.source == "release r1 (its model/ copy)"
    with pytest.raises(Exception, match=r"pass --parent VERSION.*or publish a release first"):
        resolve_parent(scenario["lake"].root, None, None)


def test_replay_selects_the_windows_just_before_and_shards_are_bounded():
    from lake_contract.delta_snapshot import DeltaSnapshot
    from lake_contract.errors import BadInputError
    from trainer.finetune import WindowPairs, check_shardable, select_window_files, smallest_shard_rows

    windows = ["2026-01-05T10", "2026-01-05T11", "2026-01-05T11", "2026-01-05T12", "2026-01-05T13", "2026-01-04"]
    snapshot = DeltaSnapshot(table_uri="file:///x", version=7, files=tuple(f"file:///x/f{i}" for i in range(6)),
                             partition_columns=("window",), partition_values=tuple({"window": w} for w in windows),
                             schema_json="{}", num_rows=600)
    picked, replayed = select_window_files(snapshot, "2026-01-05T12", 2)
    assert replayed == ("2026-01-05T10", "2026-01-05T11")
    assert picked.files == ("file:///x/f0", "file:///x/f1", "file:///x/f2", "file:///x/f3") and picked.num_rows is None
    assert select_window_files(snapshot, "2026-01-05T12", 0)[0].files == ("file:///x/f3",)
    assert select_window_files(snapshot, "2026-01-05T10", 3)[1] == ("2026-01-04",)  # a day sorts before its hours
    # every rank gets >= n // world row groups, whatever order Petastorm deals them in
    assert smallest_shard_rows((50, 10, 40, 30), 2) == 40 and smallest_shard_rows((5,), 2) == 0
    assert smallest_shard_rows((7, 3), 1) == 10
    one_group = WindowPairs(window="2026-01-05T12", replay_windows=(), snapshot=picked,
                            rows_by_window={"2026-01-05T12": 38}, row_group_rows=(38,))
    check_shardable(one_group, 1)
    with pytest.raises(BadInputError, match=r"hold 1 row group\(s\) \(38 rows\) but 2 ranks need one each"):
        check_shardable(one_group, 2)
