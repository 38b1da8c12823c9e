"""The lake contract: what every Towerlake package agrees on about the lake.

Where tables live (``lake``), the errors jobs report (``errors``), exact Delta snapshots
(``delta_snapshot``), append-only vocabularies as read without Spark (``vocab_registry``),
the ledger of completed runs (``run_ledger``) and the typed feature settings
(``feature_config``). ``spark_features/`` (Spark), ``trainer/`` (torch) and
``index_builder/`` (FAISS, serving) all import this package; it imports none of them, and
never pyspark or torch.
"""
