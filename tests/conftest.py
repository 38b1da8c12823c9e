"""Shared fixtures: ONE local Spark session for the whole test run (docs/style.md item 8).

The session carries the delta-spark jars (``.jars/``, from setup) so that both Delta engines
run in it: ``delta_io`` gives each storage test once per engine.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("TOWERLAKE_SPARK_LOG_LEVEL", "ERROR")
    from jobs.spark_context import build_spark_session

    session = build_spark_session("towerlake-tests", master="local[2]", shuffle_partitions=4)
    yield session
    session.stop()


@pytest.fixture
def native_io(spark):
    """A ``DeltaLakeIO`` on the native engine. It needs the delta-spark jars, which setup always
    fetches: missing in CI they fail the run; elsewhere (or with TOWERLAKE_DELTA_ENGINE=
    delta-rs, the session then built without them) the test is skipped."""
    from spark_features.delta_io import DeltaLakeIO, native_delta_available

    if not native_delta_available(spark):
        reason = ("native Delta engine not in this session: no delta-spark jars in .jars/ "
                  "(scripts/fetch_jars.sh fetches them) or TOWERLAKE_DELTA_ENGINE=delta-rs")
        if os.environ.get("CI") and os.environ.get("TOWERLAKE_DELTA_ENGINE", "auto") != "delta-rs":
            pytest.fail(reason)
        pytest.skip(reason)
    return DeltaLakeIO(spark, engine="native")


@pytest.fixture
def deltars_io(spark):
    from spark_features.delta_io import DeltaLakeIO

    return DeltaLakeIO(spark, engine="delta-rs")


@pytest.fixture(params=["native", "delta-rs"])
def delta_io(request):
    """The storage tests run once per engine: ``native_io`` then ``deltars_io``."""
    return request.getfixturevalue("native_io" if request.param == "native" else "deltars_io")


@pytest.fixture
def lake_root(tmp_path):
    """A fresh, empty lake root for one test."""
    root = tmp_path / "lake"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def ml_lake(spark, tmp_path_factory):
    """MovieLens-100K ingested and feature-built once per test run: (io, lake, report).
    Tests may add models/releases to it but must not rewrite its tables."""
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, ingest, read_source
    from spark_features.sources import movielens_100k_spec
    from spark_features.training_data import build_training_data

    lake = Lake(str(tmp_path_factory.mktemp("ml") / "lake"))
    io = DeltaLakeIO(spark)
    spec = movielens_100k_spec()
    ingest(spark, io, lake, read_source(spark, spec), spec, IngestOptions(batch="ml"), say=lambda _s: None)
    config = FeatureConfig(prefix_columns={"users.zip_code": 3})
    report = build_training_data(spark, io, lake, config, say=lambda _s: None)
    return io, lake, report
