# Two commands do all the set-up:  `make quickstart`  and  `make test`.
# Each creates .venv with this machine's python3 if it is missing, installs argen into it
# (skipped when nothing changed since the last install), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.argen-installed

.PHONY: quickstart test install clean-runs

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python scripts/quickstart.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs/quickstart data/shapes32
