# vlp: set-up, tests and the demo. Every target installs what it needs on a fresh Debian machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vlp + its dependencies; the extras go on top: .installed-dev (test tools) and .installed-bench (benchmark peers)
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
# the demo data (demo, tests, benchmarks); chromium runs the browser test of the search page (tests only, ~500 MB)
DATA_DEBIAN_PACKAGES := dataset-fashion-mnist tuxpaint-stamps-default
TEST_DEBIAN_PACKAGES := $(DATA_DEBIAN_PACKAGES) chromium
DEMO_DATA := data/demo
# make demo: the CLIP demo; make demo DEMO=albef: the ALBEF demo (momentum distillation, fusion encoder, ITM, MLM)
DEMO ?= clip
DEMO_CONFIG_clip := configs/pretrain/demo.yaml
DEMO_RUN_clip := runs/demo
DEMO_EVAL_clip :=
DEMO_CONFIG_albef := configs/pretrain/demo_albef.yaml
DEMO_RUN_albef := runs/demo_albef
DEMO_EVAL_albef := --rerank 16

.PHONY: help install debian-data debian-test test lint demo demo-data bench clean

help:
	@echo "make test   set up .venv and the Debian data packages, then run the test suite"
	@echo "make demo   set up, build the demo shards from the Debian data sets, check them, train a small CLIP"
	@echo "            (make demo DEMO=albef: a small ALBEF: momentum distillation, fusion encoder, ITM, MLM)"
	@echo "make lint   ruff, and the import layers (lint-imports, contracts in pyproject.toml)"
	@echo "make bench  set up (with the benchmark peers' extra packages), then run the benchmarks (python -m bench.<name>)"

install: $(STAMP)

# torch/torchvision are pinned (pyproject.toml); every other package is pinned by requirements.lock.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e .
	@touch $(STAMP)

# an extra of pyproject.toml (dev, bench) on top of the base install, pinned by the same lock; NO_DEPS_<extra>:
# packages of that extra installed without their dependencies (clip-benchmark: the tests import its aggregation only)
NO_DEPS_dev := clip-benchmark
$(VENV)/.installed-%: $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[$*]'
	$(if $(NO_DEPS_$*),$(BIN)/python -m pip install --quiet --no-deps -c requirements.lock $(NO_DEPS_$*))
	@touch $@

debian-data:
	@$(call apt_install,$(DATA_DEBIAN_PACKAGES))

debian-test:
	@$(call apt_install,$(TEST_DEBIAN_PACKAGES))

# install the Debian packages $(1) that are missing (as root, or through sudo)
define apt_install
	missing=""; \
	for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "error: the Debian packages$$missing are needed and apt-get is not available on this machine" >&2; exit 1; fi; \
	  SUDO=""; \
	  if [ "$$(id -u)" != 0 ]; then \
	    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else \
	      echo "error: installing$$missing needs root: run 'apt-get update && apt-get install -y$$missing' as root" >&2; exit 1; fi; \
	  fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
endef

test: $(DEV_STAMP) debian-test
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check vlp tests bench eval
	$(BIN)/lint-imports

demo-data: install debian-data
	$(BIN)/vlp data demo --out $(DEMO_DATA)
	$(BIN)/vlp shards check $(DEMO_DATA)/fashion_mnist/train --world-size 1 --workers 2 --no-decode
	$(BIN)/vlp shards check $(DEMO_DATA)/tuxpaint/train --world-size 1 --workers 2

demo:
	@test -n "$(DEMO_CONFIG_$(DEMO))" || { echo "error: DEMO=$(DEMO): use DEMO=clip (the default) or DEMO=albef" >&2; exit 2; }
	@$(MAKE) --no-print-directory demo-data
	$(BIN)/vlp train --config $(DEMO_CONFIG_$(DEMO)) train.output_dir=$(DEMO_RUN_$(DEMO))
	$(BIN)/vlp eval demo --run $(DEMO_RUN_$(DEMO)) --data $(DEMO_DATA) $(DEMO_EVAL_$(DEMO))
	@echo "demo run: $(DEMO_RUN_$(DEMO)) (results.json, eval/, metrics.jsonl, training_curves.png, model.safetensors)"

bench: $(BENCH_STAMP) debian-data
	$(BIN)/python -m bench.data
	$(BIN)/python -m bench.resume
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.loss_memory
	$(BIN)/python -m bench.eval
	$(BIN)/python -m bench.albef
	$(BIN)/python -m bench.retrieval

clean:
	rm -rf $(VENV) $(DEMO_DATA) runs
