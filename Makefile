# Two commands on a fresh machine:  `make serve`  and  `make test`.
# Both build .venv from nothing (CPU torch, the package with its extras) and fetch the model once.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install model test serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch (a bare `torch` would pull several GB of CUDA libraries)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

model: $(STAMP)
	$(BIN)/lmdisagg model fetch smollm2-135m

test: model
	$(BIN)/python -m pytest -q -ra --durations=20 $(PYTEST_ARGS)

serve: model
	$(BIN)/lmdisagg serve --config cluster_configs/local-cpu.yaml

clean:
	rm -rf $(VENV) .pytest_cache
