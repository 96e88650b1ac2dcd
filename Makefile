# `make demo` and `make test` set everything up in .venv on first use, then run.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The torch build this project is developed and tested with; override to use another.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q $(TORCH_SPEC)
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PYTHON) examples/finetune.py

test: setup
	$(PYTHON) -m pytest -m "not slow" -q

docs: setup
	$(PYTHON) -m mkdocs build --strict
