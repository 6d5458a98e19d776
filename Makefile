# Set-up and everyday tasks. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned CPU build: an unpinned torch would pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0
# The vision extra (torchvision, timm) lives in its own environment: on this machine kind the
# torchvision wheels are CUDA builds, and the pair that imports together is this one (6.1 GB).
VISION_VENV ?= .venv-vision
VBIN := $(VISION_VENV)/bin
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install install-vision demo test test-core docs lint format bench bench-full bench-accuracy clean

install: $(VENV)/.installed

# Sizes measured on the installed environments (du -sh): core 1.6 GB, vision 6.1 GB.
$(VENV)/.installed: pyproject.toml
	@echo "make install: the core environment in $(VENV) (about 1.6 GB on disk), in two steps"
	$(PYTHON) -m venv $(VENV)
	@echo "1/2: $(TORCH), CPU build, with sympy and networkx (about 0.9 GB)"
	$(BIN)/pip install --quiet $(TORCH)
	@echo "2/2: lip (editable), its dependencies and dev tools: pytest, ruff, matplotlib, scikit-learn, transformers, lightning (about 0.7 GB)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install-vision: $(VISION_VENV)/.installed

$(VISION_VENV)/.installed: pyproject.toml
	@echo "make install-vision: the vision environment in $(VISION_VENV) (about 6.1 GB on disk), in two steps"
	$(PYTHON) -m venv $(VISION_VENV)
	@echo "1/2: $(VISION_TORCH), CUDA builds with their nvidia and triton wheels (about 5.4 GB)"
	$(VBIN)/pip install --quiet $(VISION_TORCH)
	@echo "2/2: lip (editable), its dev tools, timm and pillow (about 0.7 GB)"
	$(VBIN)/pip install --quiet -e '.[dev,vision]'
	touch $@

# The whole flow on the built-in demo: a model and its data, the feature cache, and the recommended
# repair: --k auto with a clean validation set, which changes the head only when a test confirms it.
# Its exit code 3 (no k confirmed, nothing written: the head stays as it is) is an outcome, not a
# failure; see docs/exit-codes.md.
demo: install
	$(BIN)/lip demo demo --force
	$(BIN)/lip features demo/model.pt --model python:lip_cli.demo:demo_model --data demo/train/inputs.npy \
		--labels demo/train/targets.npy --out demo/train/features.npy --force
	$(BIN)/lip features demo/model.pt --model python:lip_cli.demo:demo_model --data demo/val/inputs.npy \
		--labels demo/val/targets.npy --out demo/val/features.npy --force
	$(BIN)/lip repair demo/model.pt --features demo/train/features.npy --val-features demo/val/features.npy \
		--k auto --force; code=$$?; [ $$code -eq 0 ] || [ $$code -eq 3 ]

# Everything, as CI runs it (.ci/run): the core suite first, then the vision environment is built
# (6.1 GB, the first time) and its suite runs.
test: test-core install-vision
	$(VBIN)/python -m pytest tests_vision

# The core suite alone, in the core environment: the contributors' loop (about 2 minutes).
test-core: install
	$(BIN)/python -m pytest

# The option tables in docs/*.md, generated from the commands (tests/test_docs.py checks them).
docs: install
	$(BIN)/python docs/options.py

lint: install
	$(BIN)/ruff check lip_cli tests tests_vision benchmarks docs
	$(BIN)/ruff format --check lip_cli tests tests_vision benchmarks docs

format: install
	$(BIN)/ruff format lip_cli tests tests_vision benchmarks
	$(BIN)/ruff check --fix lip_cli tests tests_vision benchmarks

# Timings live here, never in tests. Run on an otherwise idle machine.
bench: install
	$(BIN)/python benchmarks/speed.py --out benchmarks/speed.json
	$(BIN)/python benchmarks/scaling.py

bench-full: install
	$(BIN)/python benchmarks/speed.py --full --out benchmarks/speed.json

bench-accuracy: install
	$(BIN)/python benchmarks/noisy_labels.py --seeds 4

clean:
	rm -rf $(VENV) $(VISION_VENV) demo build *.egg-info .pytest_cache .hypothesis
