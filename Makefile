# Set-up and everyday tasks. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned CPU build: an unpinned torch would pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format bench bench-full bench-accuracy clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/lip demo demo --force
	$(BIN)/lip repair demo/model.pt --features demo/features.npy --val-features demo/val.npz --k 8 --force

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check lip_cli tests benchmarks
	$(BIN)/ruff format --check lip_cli tests benchmarks

format: install
	$(BIN)/ruff format lip_cli tests benchmarks
	$(BIN)/ruff check --fix lip_cli tests benchmarks

# Timings live here, never in tests. Run on an otherwise idle machine.
bench: install
	$(BIN)/python benchmarks/speed.py --out benchmarks/speed.json
	$(BIN)/python benchmarks/scaling.py

bench-full: install
	$(BIN)/python benchmarks/speed.py --full --out benchmarks/speed.json

bench-accuracy: install
	$(BIN)/python benchmarks/noisy_labels.py --seeds 3 --epochs 8

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .hypothesis
