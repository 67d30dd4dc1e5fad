# The two commands of the README. Both build the virtualenv from nothing: torch first (the CPU
# wheel pinned in setup.cfg), then the project with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/pretrain train --config configs/tiny.yaml train.out_dir=$(DEMO_DIR)

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q -rs

bench: install
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) runs
