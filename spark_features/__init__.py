"""Spark side of Towerlake: ingest and validation, features, pairs, and the Delta read/write edge.

Importing this package does not import pyspark: ``spark_features.delta_snapshot`` and
``spark_features.errors`` are pyspark-free so that ``trainer/`` can resolve Delta snapshots.
"""
