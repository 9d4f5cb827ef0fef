# One entry point for users and CI. `make test` builds .venv from scratch when needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv test test-min demo bench bench-quick bench-encode clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	CALIBPROMPT_DATA=$${CALIBPROMPT_DATA:-../shared/data} $(BIN)/python -m pytest -n 2 --dist loadfile -q

# The lowest versions pyproject allows (constraints-min.txt) in .venv-min: import, config, data, loss,
# metric and backbone tests. Not part of `make test` (it downloads the old wheels); its last result is in docs/ecosystem.md.
MIN_TESTS := tests/test_layers.py tests/test_config_schema.py tests/test_calibrators.py \
	tests/test_calibrators_sklearn.py tests/test_stats_scipy.py tests/test_metrics_standard.py \
	tests/test_metrics_reference.py tests/test_metrics_crosscheck.py tests/test_metrics_suite.py \
	tests/test_data_images.py tests/test_data_folder.py tests/test_data_manifest.py tests/test_data_splits.py \
	tests/test_data_medmnist.py tests/test_losses.py tests/test_losses_registry.py \
	tests/test_backbones.py tests/test_backbones_openclip.py tests/test_backbones_bert.py \
	tests/test_backbones_hf.py tests/test_backbones_medclip.py
test-min:
	$(PY) -m venv .venv-min
	.venv-min/bin/python -m pip install -q --upgrade pip
	.venv-min/bin/python -m pip install -q -c constraints-min.txt -e . pytest netcal torchmetrics relplot \
		uncertainty-calibration jsonschema medmnist
	CALIBPROMPT_DATA=$${CALIBPROMPT_DATA:-../shared/data} .venv-min/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

demo: $(STAMP)
	CALIBPROMPT_DATA=$${CALIBPROMPT_DATA:-../shared/data} $(BIN)/calibprompt demo --out demo_out

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py --quick --json bench_quick.json

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py --json bench.json

bench-encode: $(STAMP)
	$(BIN)/python benchmarks/bench_encode.py --quick --json bench_encode.json

clean:
	rm -rf $(VENV) .venv-min .pytest_cache build dist src/*.egg-info
