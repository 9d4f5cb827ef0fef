# One entry point for users and CI. `make test` builds .venv from scratch when needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench bench-quick bench-encode clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	CALIBPROMPT_DATA=$${CALIBPROMPT_DATA:-../shared/data} $(BIN)/python -m pytest -n 2 --dist loadfile -q

demo: $(STAMP)
	CALIBPROMPT_DATA=$${CALIBPROMPT_DATA:-../shared/data} $(BIN)/calibprompt demo --out demo_out

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py --quick --json bench_quick.json

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py --json bench.json

bench-encode: $(STAMP)
	$(BIN)/python benchmarks/bench_encode.py --quick --json bench_encode.json

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
