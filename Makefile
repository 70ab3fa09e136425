# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv with Python >= 3.12 and installs clx with its dev extra first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/digits_default

# Find a Python >= 3.12: $PYTHON, python3.12/3.13 on PATH, or a pyenv-installed one.
PYTHON ?= $(shell for c in python3.12 python3.13 python3; do \
    if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then command -v $$c; exit; fi; done; \
    for p in $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3; do [ -x $$p ] && echo $$p && exit; done)

.PHONY: venv demo test pmnist bench reproduce clean

$(VENV)/.installed: pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "error: clx needs Python >= 3.12; install it or pass PYTHON=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m experiments.main --config experiments/configs/digits_default.py --workdir $(WORKDIR)

test: venv
	$(VENV)/bin/ruff check clx experiments tests benchmarks
	$(VENV)/bin/ruff format --check clx experiments tests benchmarks
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=30 tests

pmnist: venv
	$(PY) -m experiments.main --config experiments/configs/pmnist_gpm.py --workdir runs/pmnist_gpm

bench: venv
	$(PY) benchmarks/projection_overhead.py

# The reproduction table (hours on CPU; resumable): REPRODUCTION.md. ROWS=pmnist_gpm/gpm,pmnist_vdv picks rows or groups.
REPRO_WORKDIR ?= runs/reproduce
reproduce: venv
	$(PY) -m experiments.reproduce --workdir $(REPRO_WORKDIR) $(if $(ROWS),--rows $(ROWS))

clean:
	rm -rf $(VENV) runs
