"""The one place that builds a SparkSession for Towerlake jobs and test fixtures.

Library code (``spark_features``) takes the session as an argument; it never builds one.
"""

from __future__ import annotations

import os
import sys
import tempfile


def build_spark_session(app_name: str, master: str | None = None, shuffle_partitions: int | None = None):
    """Return a SparkSession configured the way Towerlake's storage layer expects.

    ``master`` defaults to whatever spark-submit set, else ``local[*]``. The settings that
    matter for correctness (not just speed) are:

    * ``spark.sql.parquet.outputTimestampType=TIMESTAMP_MICROS``: Spark's INT96 default is a
      deprecated encoding that other Delta readers handle badly;
    * ``spark.sql.session.timeZone=UTC``: event dates are UTC dates everywhere;
    * ``spark.pyspark.python``: Python workers use this interpreter (the pipeline env), so
      Arrow UDFs see the same pyarrow as the driver.
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if master or "spark.master" not in _submitted_conf():
        builder = builder.master(master or os.environ.get("TOWERLAKE_SPARK_MASTER", "local[*]"))
    partitions = shuffle_partitions or int(os.environ.get("TOWERLAKE_SHUFFLE_PARTITIONS", "8"))
    warehouse = os.environ.get("TOWERLAKE_SPARK_WAREHOUSE") or tempfile.mkdtemp(prefix="towerlake-warehouse-")
    builder = (
        builder.config("spark.sql.shuffle.partitions", str(partitions))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.sql.warehouse.dir", warehouse)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", os.environ.get("TOWERLAKE_DRIVER_MEMORY", "4g"))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
    )
    if not os.environ.get("PYSPARK_PYTHON"):
        builder = builder.config("spark.pyspark.python", sys.executable)
    if _delta_jars_requested():
        builder = builder.config(
            "spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension"
        ).config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("TOWERLAKE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def _submitted_conf() -> dict[str, str]:
    """Spark conf that spark-submit passed to this driver (empty when run as plain python)."""
    from pyspark import SparkConf

    return dict(SparkConf().getAll())


def _delta_jars_requested() -> bool:
    """True when the caller asked for the native Delta engine (jars on the classpath)."""
    return os.environ.get("TOWERLAKE_DELTA_ENGINE", "auto") == "native"
