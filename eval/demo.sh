#!/usr/bin/env bash
# The demo's evaluations (Fashion-MNIST zero-shot, Tux Paint retrieval) -> RUN/results.json, RUN/retrieval_grid.png.
#   RUN    the demo run directory (default: runs/demo; `make demo` trains it)
#   DATA   the demo shards (default: data/demo; `vlp data demo --out data/demo` builds them)
set -euo pipefail
PYTHON=${PYTHON:-python}
"$PYTHON" -m vlp eval demo --run "${RUN:-runs/demo}" --data "${DATA:-data/demo}" --workers "${WORKERS:-2}"
