# Set-up and the main jobs. Every target creates .venv if needed and installs the
# package with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Two cores: pytest-xdist workers. Override with `make test WORKERS=1`.
WORKERS ?= 2

.PHONY: demo test lint bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pso-jax demo --workdir demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check pso_jax tests benchmarks
	$(BIN)/ruff format --check pso_jax tests benchmarks

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/swarm_step.py --out benchmarks/results

bench-quick: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/swarm_step.py --quick --out benchmarks/results/quick

clean:
	rm -rf $(VENV) demo_out .pytest_cache
