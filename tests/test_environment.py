"""The two environments hold what the README promises (pins measured in docs/stack.md)."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_PY = REPO / ".venv-airflow" / "bin" / "python"


@pytest.mark.parametrize(
    ("package", "version"),
    [("pyspark", "4.0.5"), ("pyarrow", "14.0.2"), ("numpy", "1.26.4"), ("petastorm", "0.12.1"),
     ("deltalake", "1.6.6"), ("faiss-cpu", "1.15.1"), ("recbole", "1.2.1")],
)
def test_pipeline_env_has_the_pinned_versions(package, version):
    assert md.version(package) == version


def test_pipeline_pyspark_is_the_real_one_not_the_airflow_client():
    import pyspark

    assert pyspark.__version__ == "4.0.5"
    jars = Path(pyspark.__file__).parent / "jars"
    assert any(p.name.startswith("spark-core_") for p in jars.iterdir()), "pyspark without Spark jars"


def test_torch_is_the_cpu_build_and_petastorm_imports_with_pyarrow_14():
    import petastorm  # noqa: F401  (imports pyarrow.filesystem, removed in pyarrow 15)
    import torch

    assert torch.__version__.startswith("2.13.0")


def test_horovod_was_built_with_torch_and_gloo():
    hvd = pytest.importorskip("horovod.torch", reason="setup ran with TOWERLAKE_SKIP_HOROVOD=1")
    assert hvd.gloo_built()
    assert not hvd.mpi_built()


def test_airflow_env_is_separate_and_has_airflow_3_and_the_spark_provider():
    if not AIRFLOW_PY.exists():
        pytest.skip("setup ran with TOWERLAKE_SKIP_AIRFLOW=1")
    code = (
        "import importlib.metadata as md; "
        "print(md.version('apache-airflow'), md.version('apache-airflow-providers-apache-spark'))"
    )
    out = subprocess.run([str(AIRFLOW_PY), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3.3.2", "6.3.4"]
    # The reason for two envs: the provider pulls pyspark-client, which must never reach the
    # pipeline env (it would shadow the real pyspark).
    with pytest.raises(md.PackageNotFoundError):
        md.version("pyspark-client")
    assert sys.prefix != str(AIRFLOW_PY.parent.parent)
