# The README's two commands are `make demo` and `make test`; both set up first (seconds
# when the environments are already there).
PY := .venv/bin/python
LAKE ?= lake
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean-lake airflow

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh $(LAKE)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

# A local Airflow (scheduler + UI) running airflow_dags/ (docs/airflow.md).
airflow: setup
	bash scripts/airflow.sh

bench: setup
	$(PY) benchmarks/bench_ingest.py

clean-lake:
	rm -rf $(LAKE)
