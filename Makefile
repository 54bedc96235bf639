# `make demo` and `make test` set up everything themselves (a virtualenv in .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# A private Prefect home, so the demo and the tests never touch your own profile or server.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test clean sandbox-up sandbox-down

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/imagegen sandbox up
	@$(BIN)/imagegen run pipelines/demo.yaml; rc=$$?; $(BIN)/imagegen sandbox down; exit $$rc

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

sandbox-up: $(STAMP)
	$(BIN)/imagegen sandbox up

sandbox-down: $(STAMP)
	$(BIN)/imagegen sandbox down

clean:
	-$(BIN)/imagegen sandbox down 2>/dev/null
	rm -rf $(VENV) .prefect .sandbox .pytest_cache *.egg-info
