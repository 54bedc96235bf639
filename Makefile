# `make demo` and `make test` set up everything themselves (a virtualenv in .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# A private Prefect home, so the demo and the tests never touch your own profile or server.
export PREFECT_HOME ?= $(CURDIR)/.prefect
# No usage data sent from the demo and the tests: the server's (its telemetry also printed a
# `database is locked` traceback on SQLite) and the SDK's (whose first-run notice said to set this).
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK ?= 1

# Debian packages: Real-ESRGAN (the `realesrgan` upscale engine) needs the three libraries;
# the UI test drives Chromium; the multi-worker and API-replica tests run PostgreSQL and Redis.
# As root, make installs them; otherwise, or where apt cannot, the engine reports what is
# missing and the tests that need them skip with that reason.
SYSTEM_LIBS := libomp5-14 libvulkan1 libgl1 chromium postgresql redis-server

.PHONY: setup system-libs bench-libs demo check faults test bench clean sandbox-up sandbox-down

setup: $(STAMP)

system-libs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s $(SYSTEM_LIBS) >/dev/null 2>&1; then \
	  echo "installing $(SYSTEM_LIBS) (Real-ESRGAN, UI test)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_LIBS) >/dev/null) \
	    || echo "could not install $(SYSTEM_LIBS): the tests that need them will be skipped"; \
	fi

$(STAMP): pyproject.toml requirements.txt constraints.txt
	@$(MAKE) --no-print-directory system-libs
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,review,realesrgan,sandbox,redis,bench]'
	touch $@

# The benchmark's Prefect server runs on a throwaway PostgreSQL cluster when Debian's
# postgresql is installed (as root, make installs it); otherwise on SQLite, which is slower
# under load. See README "Performance".
bench-libs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s postgresql >/dev/null 2>&1; then \
	  echo "installing postgresql (the benchmark's Prefect server database)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || echo "could not install postgresql: the benchmark will use SQLite"; \
	fi

bench: $(STAMP) bench-libs
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The recipe's shell outlives a Ctrl-C (`trap : INT`; imagegen itself still gets it and stops
# the run), so the sandbox is stopped however the run ends.
demo: $(STAMP)
	$(BIN)/imagegen sandbox up --free-ports  # works whatever holds the default ports
	@trap : INT; $(BIN)/imagegen run pipelines/demo.yaml; rc=$$?; $(BIN)/imagegen sandbox down; exit $$rc

# The unit tier (no sandbox, no Prefect server, nothing slow; under a minute): run it while you work.
check: $(STAMP)
	$(BIN)/python -m pytest -m unit -q $(PYTEST_ARGS)

# The fault matrix: every moment of a paid step stopped, on every provider (a few minutes; docs/paying-once.md).
faults: $(STAMP)
	$(BIN)/python -m pytest -m faults -q $(PYTEST_ARGS)

# Everything: the unit, sandbox, server and slow tiers (see README "Tests"), a file per worker at
# a time: most tests wait on leases, jobs and servers, so TEST_WORKERS exceeds the cores.
TEST_WORKERS ?= 4
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

sandbox-up: $(STAMP)
	$(BIN)/imagegen sandbox up

sandbox-down: $(STAMP)
	$(BIN)/imagegen sandbox down

clean:
	-$(BIN)/imagegen sandbox down 2>/dev/null
	rm -rf $(VENV) .prefect .sandbox .pytest_cache *.egg-info
