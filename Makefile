# Two commands do all the set-up on a fresh machine; each makes the virtualenv .venv once (the CPU
# torch wheel, then requirements.txt) and reuses it:
#   make tiny   the one command: python train_dmd.py --tiny (ODE pairs -> ODE init -> DMD -> scores)
#   make test   ruff (format and check), then the test suite; .ci/run runs this
# For your own environment or a CUDA torch, use the plain pip and python lines in README.md.
VENV := .venv
PYTHON := $(VENV)/bin/python

$(VENV)/installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

tiny: $(VENV)/installed
	$(PYTHON) train_dmd.py --tiny

test: $(VENV)/installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q tests

.PHONY: tiny test
