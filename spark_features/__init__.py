"""Spark side of Towerlake: ingest and validation, features, pairs, and the Delta read/write edge.

Only Spark code lives here. What the trainer and serving share with it (lake paths, errors,
Delta snapshots, vocabulary reads, the run ledger, feature settings) is in ``lake_contract``.
"""
