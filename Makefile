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
	rm -rf demo_out
	$(BIN)/pso-jax demo --workdir demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check pso_jax tests benchmarks
	$(BIN)/ruff format --check pso_jax tests benchmarks

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	touch $@

# `make bench`: every benchmark at full size, results in benchmarks/results/ (hours
# on the shared 2-core machine: see benchmarks/README.md). `make bench-quick`:
# reduced grids in benchmarks/results/quick/ (9 min on an idle machine, more
# under load). Each script also runs alone, e.g.
# `make bench-search-quality`, or `make bench-search-quality QUICK=1`.
RESULTS = benchmarks/results$(if $(QUICK),/quick)
QUICK_FLAG = $(if $(QUICK),--quick)
BENCH_TARGETS = bench-swarm-step bench-search-quality bench-video-fitness \
	bench-learning-curves
.PHONY: $(BENCH_TARGETS)

bench: $(BENCH_TARGETS)

bench-quick:
	$(MAKE) QUICK=1 $(BENCH_TARGETS)

bench-swarm-step: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/swarm_step.py $(QUICK_FLAG) --out $(RESULTS)

bench-search-quality: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/search_quality.py $(QUICK_FLAG) --out $(RESULTS)

bench-video-fitness: $(VENV)/.bench-installed
	mkdir -p $(RESULTS)
	$(BIN)/python benchmarks/video_fitness.py $(QUICK_FLAG) \
		--out $(RESULTS)/video_fitness.md

bench-learning-curves: $(VENV)/.bench-installed
	PYTHONPATH=. $(BIN)/python benchmarks/learning_curves.py $(QUICK_FLAG) --out $(RESULTS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
