"""Release gate policy: what a candidate model + index must reach before it may become CURRENT.

The one place that decides it: ``jobs.publish`` (and the DAGs through it) take the defaults
from here, ``publishing.publish_model_release`` calls ``check_gates``.

* ``index_recall``: the index's recall@K vs exact search at its tuned nprobe reaches the
  index's own recall target (``IndexConfig.recall_target``, 0.95 by default).
* ``model_quality``: the candidate's validation metric (``DEFAULT_METRIC``) is not worse than
  the CURRENT release's same metric by more than ``DEFAULT_TOLERANCE``; no comparison when
  nothing is published yet.
"""

from __future__ import annotations

import math
from typing import Any

from lake_contract.errors import TowerlakeError

DEFAULT_METRIC = "hr@50"
DEFAULT_TOLERANCE = 0.01


class GateFailedError(TowerlakeError):
    """A candidate release failed a quality gate; it must not be made current."""


def _fmt(value: float) -> str:
    """0.4 -> '0.40', 0.91234 -> '0.9123': at least 2, at most 4 decimals."""
    text = f"{value:.4f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:.{max(2, decimals)}f}"


def check_gates(
    index_recall: float,
    recall_target: float,
    candidate_metric: float,
    current_metric: float | None,
    tolerance: float,
    metric_name: str,
    recall_k: int = 100,
) -> dict[str, dict[str, Any]]:
    """Quality gates a candidate must pass before it may become current.

    index_recall: the index's mean recall@``recall_k`` vs exact search at its tuned nprobe,
    must be >= recall_target. candidate_metric: the new model's offline metric (higher is
    better, e.g. HR@50), must not be below ``current_metric - tolerance`` (skipped when there
    is no current release, ``current_metric`` None). Returns the gate results for the
    manifest; raises GateFailedError naming every failed gate, its value and its threshold.
    """
    for name, value in (("index_recall", index_recall), ("recall_target", recall_target),
                        ("candidate_metric", candidate_metric)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if current_metric is not None and (isinstance(current_metric, bool) or not isinstance(current_metric, int | float)):
        raise ValueError(f"current_metric must be a number or None, got {current_metric!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")

    failures = []
    recall_ok = not math.isnan(index_recall) and index_recall >= recall_target
    if not recall_ok:
        failures.append(
            f"gate index_recall: recall@{recall_k}={_fmt(index_recall)} < target {_fmt(recall_target)}"
        )
    if current_metric is None:
        quality_ok = not math.isnan(candidate_metric)
        if not quality_ok:
            failures.append(f"gate model_quality: {metric_name}=nan is not a number")
    else:
        # 1e-12: 0.39 vs 0.40 - 0.01 must pass despite binary floating point.
        quality_ok = not math.isnan(candidate_metric) and candidate_metric >= current_metric - tolerance - 1e-12
        if not quality_ok:
            failures.append(
                f"gate model_quality: {metric_name}={_fmt(candidate_metric)} is worse than the current "
                f"release's {_fmt(current_metric)} by more than the tolerance {_fmt(tolerance)}"
            )
    if failures:
        raise GateFailedError("; ".join(failures))
    return {
        "index_recall": {"passed": True, "k": recall_k, "value": index_recall, "target": recall_target},
        "model_quality": {
            "passed": True,
            "metric": metric_name,
            "value": candidate_metric,
            "current": current_metric,
            "tolerance": tolerance,
        },
    }
