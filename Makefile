# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench faults clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

## run: start the gateway on embedded defaults at http://127.0.0.1:8080 (demo at /demo)
run: $(STAMP)
	OMNIGATE_COOKIE_SECURE=$${OMNIGATE_COOKIE_SECURE:-false} $(VENV)/bin/omnigate serve --demo

## test: the whole suite against real PostgreSQL and Redis (embedded ones when none is given)
test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway policies tests bench
	$(VENV)/bin/ruff format --check gateway policies tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy gateway policies

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .omnigate .pytest_cache
