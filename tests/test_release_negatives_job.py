"""jobs.build_features' release step: when and what it hands the full build as ``ranked``."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.build_features import _release_ranked, parse_config
from lake_contract.delta_snapshot import read_table_deltars
from lake_contract.lake import Lake
from tests.test_recommend import publish_tiny_release
from tests.tiny_lake import make_tiny_lake

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    work = tmp_path_factory.mktemp("release-negatives")
    root = work / "lake"
    lake = make_tiny_lake(root)
    publish_tiny_release(root, Path(lake["model_path"]), work)
    return root


def test_a_published_release_is_mined_and_handed_over_as_user_lists(spark, released):
    from spark_features.delta_io import DeltaLakeIO

    ranked = _release_ranked(DeltaLakeIO(spark), Lake(str(released)), parse_config(["--lake", str(released)]))
    got = sorted((r["user_idx"], list(r["items"])) for r in ranked.collect())
    table = read_table_deltars(str(released / "negatives/release_ranked")).to_pylist()
    assert got == sorted((r["user_idx"], r["items"]) for r in table)
    assert ranked.columns == ["user_idx", "items"] and len(got) == 19  # every tiny-lake user
    assert all(r["first_rank"] == 20 and r["release_version"] == "r1" for r in table)


@pytest.mark.parametrize("argv", [["--release-negatives", "off"], ["--negatives", "random:4,popularity:2"]])
def test_off_or_no_hard_kind_mines_nothing(spark, tmp_path, argv):
    from spark_features.delta_io import DeltaLakeIO

    root = tmp_path / "lake"
    lake = make_tiny_lake(root)
    publish_tiny_release(root, Path(lake["model_path"]), tmp_path)
    assert _release_ranked(DeltaLakeIO(spark), Lake(str(root)), parse_config(["--lake", str(root), *argv])) is None
    assert not (root / "negatives").exists()


def test_no_release_yet_means_category_hard_negatives_only(spark, tmp_path, capsys):
    from spark_features.delta_io import DeltaLakeIO

    root = tmp_path / "lake"
    make_tiny_lake(root)
    assert _release_ranked(DeltaLakeIO(spark), Lake(str(root)), parse_config(["--lake", str(root)])) is None
    assert "no published release yet" in capsys.readouterr().out
