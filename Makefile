# Two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# Everything runs inside .venv, created and kept in sync with requirements.txt by scripts/setup_env.sh.
PY := .venv/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0

.PHONY: setup demo demo-quick test test-fast gallery benchmark tiny-vae

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m experiments.demo $(ARGS)

demo-quick: setup
	$(PY) -m experiments.demo --quick $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

# distil the tiny autoencoder from the demo's VAE and add it to both demo pipelines (after `make demo`)
tiny-vae: setup
	$(PY) -m experiments.tiny_vae $(ARGS)

gallery: setup
	$(PY) -m datamodules.gallery --out outputs/gallery.png
