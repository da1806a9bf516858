# The two commands a new machine needs (README): `make run` and `make test`.
# Both install what is missing first (scripts/bootstrap.sh: mosquitto + .venv).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bootstrap default-model bench bench-e2e clean

bootstrap:
	@bash scripts/bootstrap.sh

## run: the daemon on embedded defaults with simulated devices, against a local broker
run: bootstrap
	$(BIN)/anomalyd demo

## test: lint, type-check and the whole test suite (what CI runs)
test: bootstrap lint
	$(BIN)/python -m pytest

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## default-model: re-train and re-export exported_models/default (about 15 minutes on 2 cores)
default-model: bootstrap
	$(BIN)/anomalyd-train train --config training/configs/default.toml --out exported_models/default

## bench: pipeline throughput as a ratio of the model-only limit measured in the same run
## (the daemon end to end, MQTT included: `make bench-e2e`, i.e. `anomalyd bench`)
bench: bootstrap
	$(BIN)/python benchmarks/bench_pipeline.py

## bench-e2e: `anomalyd bench`: the real daemon behind mosquitto, about 10 minutes (docs/benchmarks.md)
bench-e2e: bootstrap
	$(BIN)/anomalyd bench --json bench-e2e.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
