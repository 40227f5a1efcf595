# The two commands the README opens with:
#   make demo   install (core + custody, provenance, release, server, cluster, plot, fast extras) and run the
#               whole lifecycle end to end
#   make test   install (core + dev + every extra) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install install-dev system-deps bench fuzz lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# constraints-test.txt pins the CPU torch wheel for tests and the demo; the extras take torch as a range.
install: $(BIN)/python
	$(BIN)/pip install -q -c constraints-test.txt -e '.[custody,provenance,release,server,cluster,plot,fast]'

install-dev: $(BIN)/python system-deps
	$(BIN)/pip install -q -c constraints-test.txt -e '.[dev,all]'

# Debian packages the tests use: SoftHSM2 (a real PKCS#11 token for the HSM provider), and
# Chromium with its WebDriver (the web console's tests drive it headless).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@{ command -v softhsm2-util && command -v chromium && command -v chromedriver; } >/dev/null || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	  softhsm2 chromium chromium-driver >/dev/null; }

demo: install
	$(BIN)/python demo/run.py --figures demo-figures

test: install-dev
	$(BIN)/ruff check src tests bench fuzz demo
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

bench: install-dev
	$(BIN)/pip install -q -c constraints-test.txt -e '.[bench]'
	$(BIN)/python bench/seal.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/custody.py
	$(BIN)/python bench/provenance.py
	$(BIN)/python bench/tracing.py
	$(BIN)/python bench/auditlog.py
	$(BIN)/python bench/broker.py
	$(BIN)/python bench/export.py

fuzz: install-dev
	$(BIN)/python fuzz/fuzz_sealed.py -atheris_runs=200000

lint: install-dev
	$(BIN)/ruff check src tests bench fuzz demo
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info src/*.egg-info
