# Two entry points for a fresh machine (Debian/Ubuntu, Python 3.11+, root or sudo for apt):
#   make demo   set everything up, then run the main job on the embedded synthetic dataset
#   make test   set everything up, then check the import layers (lint-imports) and run the test suite
# Both are idempotent: the set-up is skipped while pyproject.toml is unchanged.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.calm-fast-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# DeepSpeed compiles its CPU communication op once; keep the build inside the venv.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@pkg-config --exists opencv4 libturbojpeg 2>/dev/null || { \
	  echo "Installing the system libraries FFCV builds against (pkg-config, OpenCV, libturbojpeg)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq pkg-config libopencv-dev libturbojpeg0-dev; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]' deepspeed==0.19.8 ffcv==1.0.2
	@touch $@

demo: setup
	$(VENV)/bin/calm-fast demo

test: setup
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/calm-fast bench all

clean:
	rm -rf runs data
