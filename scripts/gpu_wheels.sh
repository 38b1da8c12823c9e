#!/usr/bin/env bash
# Wheels a GPU machine's Python 3.12 (its own torch, nothing else) needs to run
# benchmarks/bench_gpu.py with the pipeline's pins, in three folders of under 64 MiB each
# (.whl/gpu/{1,2,3}, ignored by git) so each can travel on its own. See bench_gpu.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
get() {  # folder, requirements...
  mkdir -p ".whl/gpu/$1"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d ".whl/gpu/$1" "${@:2}"
}
get 1 deltalake==1.6.6 petastorm==0.12.1 dill==0.4.1 diskcache==5.6.3 fsspec future==1.0.0 psutil==7.2.2 \
  six==1.17.0 packaging python-dateutil pytz tzdata
get 2 pyarrow==14.0.2           # petastorm 0.12.1 needs pyarrow < 15
get 3 numpy==1.26.4 pandas==2.2.3  # pyarrow 14 wheels are built against numpy 1.x
du -sh .whl/gpu/*
