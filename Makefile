# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv, installs clrlab, trains on the embedded default dataset (no network)
#   make test    creates .venv, installs clrlab with its test extra, runs the test suite (all but the `slow`
#                end-to-end tests: kill -9 / multi-process / long command-line runs; `make test-slow` runs those,
#                `.ci/run` runs both)
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: venv train test test-slow bench range-test lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(PY) -m clrlab.train --policy=exp_range --gamma=0.99994 $(ARGS)

range-test: $(STAMP)
	$(PY) -m clrlab.range_finder $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
