# Two commands set everything up on a bare machine (Python 3.11 and make): `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel from local disk on CPU-only machines; on a GPU machine: make TORCH_SPEC=torch test
TORCH_SPEC ?= torch==2.13.0
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint format browser
BROWSER_HINT := headless Chromium is missing, so the report's browser tests are skipped; install it with: sudo apt-get update && sudo apt-get install -y chromium

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,zoo,ray]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/rl-circuits demo

test: $(VENV)/.installed lint browser
	$(PY) -m pytest -q -rs
	@command -v chromium >/dev/null 2>&1 || echo "make test: $(BROWSER_HINT)"

# The report's browser tests need headless Chromium: installed from Debian when running as root.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) ; } \
		|| echo "make test: $(BROWSER_HINT)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
