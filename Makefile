# Every target creates .venv when it is missing; `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast soak bench lint typecheck clean

$(STAMP): pyproject.toml setup.py kernels/_hashing.pyx
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# MovieLens-100K ships inside recbole's wheel; the tests read the file and never
	# import recbole, so none of its (heavy) dependencies are installed
	$(BIN)/python -m pip install --quiet --no-deps recbole==1.2.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pserver.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

soak: $(STAMP)
	RAFT_SEEDS=5000 SIM_SEEDS=5000 $(BIN)/python -m pytest -q tests/raft

bench: $(STAMP)
	$(BIN)/pserver bench --report

typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/pserver
	for f in pserver/*; do ln -s ../../../$$f build/typecheck/pserver/; done
	ln -s ../../../kernels build/typecheck/pserver/kernels
	ln -s ../../../protocol build/typecheck/pserver/protocol
	ln -s ../../../clients build/typecheck/pserver/clients
	$(BIN)/mypy

lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/test_layers.py

clean:
	rm -rf build dist *.egg-info kernels/*.so kernels/*.c
