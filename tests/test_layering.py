"""The package layering of docs/design.md, checked on the source: which first-party package
may import which, and which heavy third-party stacks each one keeps out. The lake contract
(`lake_contract/`) is the neutral centre every other package builds on; it must never pull
in Spark or torch, or the trainer and the Spark jobs would again depend on each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lake_contract", "spark_features", "trainer", "index_builder", "jobs", "airflow_dags")

# first-party imports allowed anywhere in a package's modules (top level or inside functions)
ALLOWED = {
    "lake_contract": set(),
    "spark_features": {"lake_contract"},
    "trainer": {"lake_contract"},
    "index_builder": {"lake_contract", "trainer"},
    "jobs": {"lake_contract", "spark_features", "trainer", "index_builder"},
    "airflow_dags": set(),
}
# third-party stacks a package must not import at all
NEVER = {
    "lake_contract": {"torch", "pyspark", "faiss", "petastorm", "horovod", "airflow"},
    "spark_features": {"torch", "faiss", "petastorm", "horovod", "airflow"},
    "trainer": {"faiss", "airflow"},
    "index_builder": {"pyspark", "horovod", "airflow"},
    "airflow_dags": {"torch", "pyspark", "faiss", "petastorm", "deltalake", "horovod"},
}
# ... and those it may use only lazily (inside a function), so importing it stays cheap
NOT_AT_TOP = {
    "trainer": {"pyspark", "petastorm", "horovod"},
    "jobs": {"torch", "pyspark", "faiss"},
}


def _imports(package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(every top-level module name imported anywhere, those imported at module level), by file."""
    anywhere, top = {}, {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(ROOT))
        anywhere[rel] = {name for node in ast.walk(tree) for name in _names(node, package)}
        top[rel] = {name for node in tree.body for name in _names(node, package)}
    return anywhere, top


def _names(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [package] if node.level else [node.module.split(".")[0]]
    return []


def test_first_party_import_graph_follows_the_layering():
    graph = {}
    for package in PACKAGES:
        anywhere, _ = _imports(package)
        assert anywhere, f"no modules found in {package}/"
        uses = {name for names in anywhere.values() for name in names if name in PACKAGES and name != package}
        graph[package] = uses
        bad = {f: sorted((names & set(PACKAGES)) - ALLOWED[package] - {package}) for f, names in anywhere.items()}
        assert not {f: b for f, b in bad.items() if b}, f"{package} imports outside its layer"
    # every allowed edge is used: the graph is exactly the documented one, and a new edge is a
    # design change (edit ALLOWED and docs/design.md), not a drive-by
    assert graph == ALLOWED


@pytest.mark.parametrize("package", sorted(NEVER))
def test_package_keeps_foreign_stacks_out(package):
    anywhere, _ = _imports(package)
    found = {f: sorted(names & NEVER[package]) for f, names in anywhere.items() if names & NEVER[package]}
    assert not found, f"{package} imports stacks it must not: {found}"


@pytest.mark.parametrize("package", sorted(NOT_AT_TOP))
def test_heavy_stacks_are_imported_lazily(package):
    _, top = _imports(package)
    found = {f: sorted(names & NOT_AT_TOP[package]) for f, names in top.items() if names & NOT_AT_TOP[package]}
    assert not found, f"{package} imports at module level what it must import lazily: {found}"
