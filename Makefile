# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench clean lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
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

## lock: re-resolve the newest versions pyproject.toml allows into constraints.txt
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[test,bench]'
	{ grep '^#' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .omnigate .pytest_cache
