"""Shared fixtures: ONE local Spark session for the whole test run (STYLE.md item 8)."""

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
def lake_root(tmp_path):
    """A fresh, empty lake root for one test."""
    root = tmp_path / "lake"
    root.mkdir()
    return root
