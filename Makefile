# Two commands for a newcomer: `make demo` (default experiment) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/synthetic_b0c4

.PHONY: venv demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m rebll_jax.main --config=configs/synthetic.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) workdirs
