# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# torch==2.13.0 (CPU) is a wheel on this machine's disk; pip finds it here.
ifneq ($(wildcard /opt/wheels),)
export PIP_FIND_LINKS ?= /opt/wheels
endif
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-unit test-integration test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[cluster,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/visionfleet demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" tests --durations=25

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" tests/integration

# Heavy scenario checks that do not fit CI (full demo with targets, long runs).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow tests -s

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
