"""The one place that builds a SparkSession for Towerlake jobs and test fixtures.

Library code (``spark_features``) takes the session as an argument; it never builds one.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def build_spark_session(app_name: str, master: str | None = None, shuffle_partitions: int | None = None):
    """Return a SparkSession configured the way Towerlake's storage layer expects.

    ``master`` defaults to whatever spark-submit set, else ``local[*]``. The settings that
    matter for correctness (not just speed) are:

    * ``spark.sql.parquet.outputTimestampType=TIMESTAMP_MICROS``: Spark's INT96 default is a
      deprecated encoding that other Delta readers handle badly;
    * ``spark.sql.session.timeZone=UTC``: event dates are UTC dates everywhere;
    * the Python workers' interpreter: PySpark takes it from ``PYSPARK_PYTHON`` only (the
      ``spark.pyspark.python`` conf is read by spark-submit's launcher, not by a driver
      started as plain ``python``), and without it workers run the machine's ``python3``,
      which lacks pyarrow/numpy, so every Arrow UDF fails. When unset, it is set to the
      conf spark-submit passed, else to this interpreter (the pipeline env).

    Speed defaults: 64 shuffle partitions with AQE coalescing (small inputs are merged back
    into few tasks; 10M events fit the default heap), Arrow batches of 50k rows, Spark's
    stage progress bar only when stderr is a terminal (never in CI logs).
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if master or "spark.master" not in _submitted_conf():
        builder = builder.master(master or os.environ.get("TOWERLAKE_SPARK_MASTER", "local[*]"))
    partitions = shuffle_partitions or int(os.environ.get("TOWERLAKE_SHUFFLE_PARTITIONS", "64"))
    if not os.environ.get("PYSPARK_PYTHON"):
        os.environ["PYSPARK_PYTHON"] = _submitted_conf().get("spark.pyspark.python") or sys.executable
    warehouse = os.environ.get("TOWERLAKE_SPARK_WAREHOUSE") or tempfile.mkdtemp(prefix="towerlake-warehouse-")
    builder = (
        builder.config("spark.sql.shuffle.partitions", str(partitions))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.coalescePartitions.enabled", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.sql.warehouse.dir", warehouse)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())
        .config("spark.driver.memory", os.environ.get("TOWERLAKE_DRIVER_MEMORY", "4g"))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "50000")
        .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
    )
    for key, value in delta_session_conf(_submitted_conf()).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("TOWERLAKE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def _submitted_conf() -> dict[str, str]:
    """Spark conf that spark-submit passed to this driver (empty when run as plain python).

    spark-submit starts the JVM first and hands its gateway port to this process; a
    ``SparkConf`` built before the gateway is connected would be an empty Python dict, so
    connect first (plain python has no gateway yet: starting one here would drop the
    driver settings that must be given at JVM launch).
    """
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return {}
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return dict(SparkConf().getAll())


# The native Delta engine (docs/lake.md): delta-spark's jars, put in .jars/ by
# scripts/fetch_jars.sh at setup, never fetched here.
DELTA_JARS_DIR = Path(__file__).resolve().parents[1] / ".jars"
DELTA_JAR_PREFIXES = ("delta-spark_2.13-", "delta-storage-")


def delta_jars(folder: Path | None = None) -> list[str]:
    """The delta-spark jars in ``folder`` (``$TOWERLAKE_JARS`` or ``<repo>/.jars``), or [] when
    either is missing."""
    folder = Path(folder or os.environ.get("TOWERLAKE_JARS") or DELTA_JARS_DIR)
    found = [sorted(folder.glob(f"{prefix}*.jar")) for prefix in DELTA_JAR_PREFIXES] if folder.is_dir() else []
    if len(found) != len(DELTA_JAR_PREFIXES) or not all(found):
        return []
    return [str(jars[-1]) for jars in found]


def delta_session_conf(submitted: dict[str, str]) -> dict[str, str]:
    """Spark settings for the native Delta engine, per ``TOWERLAKE_DELTA_ENGINE``:

    * ``auto`` (default): the jars in ``.jars/`` when there (else whatever spark-submit passed
      with ``--jars``/``--packages``), with the session extension and catalog; nothing at all
      when neither has delta-spark, and the jobs use delta-rs;
    * ``native``: the same, and the extension even without local jars (a cluster that ships
      them another way); ``DeltaLakeIO`` says clearly when the classes are still missing;
    * ``delta-rs``: nothing: the session has no Delta classes, as before the jars existed.
    """
    engine = os.environ.get("TOWERLAKE_DELTA_ENGINE", "auto")
    if engine not in ("auto", "native", "delta-rs"):
        raise ValueError(f"TOWERLAKE_DELTA_ENGINE must be 'auto', 'native' or 'delta-rs', got {engine!r}")
    if engine == "delta-rs":
        return {}
    conf: dict[str, str] = {}
    jars = delta_jars()
    submitted_jars = [j for j in submitted.get("spark.jars", "").split(",") if j]
    if jars and not any("delta-spark" in j for j in submitted_jars):
        conf["spark.jars"] = ",".join([*submitted_jars, *jars])
    shipped = any("delta-spark" in submitted.get(k, "") for k in ("spark.jars", "spark.jars.packages"))
    if jars or shipped or engine == "native":
        extensions = [e for e in submitted.get("spark.sql.extensions", "").split(",") if e]
        conf["spark.sql.extensions"] = ",".join(dict.fromkeys([*extensions, "io.delta.sql.DeltaSparkSessionExtension"]))
        conf["spark.sql.catalog.spark_catalog"] = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
        # Deletion vectors would make a table's file list (Petastorm's input) include deleted
        # rows: new tables never get them, MERGE stays copy-on-write.
        conf["spark.databricks.delta.properties.defaults.enableDeletionVectors"] = "false"
        # Log replay in a few tasks, not Delta's 50: the logs here are small; a cluster with huge
        # logs passes --conf spark.databricks.delta.snapshotPartitions=N (which wins).
        if "spark.databricks.delta.snapshotPartitions" not in submitted:
            conf["spark.databricks.delta.snapshotPartitions"] = os.environ.get(
                "TOWERLAKE_DELTA_SNAPSHOT_PARTITIONS", "4")
    return conf
