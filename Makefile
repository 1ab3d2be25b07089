# Every target does its own set-up, so `make test` and `make check` work on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
TORCH_CPU_VERSION := 2.13.0
export TRITON_DEFAULT_FP_FUSION ?= 1

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cu csrc/*.h csrc/*.cuh csrc/*.cpp csrc/host/*)

.PHONY: setup test check bench info lint clean

# Reinstalls (ninja rebuilds only what changed) when the build inputs are newer than the last install.
setup: .setup-stamp

.setup-stamp: $(SOURCES)
	@# Keep a CUDA build of torch if there is one; otherwise pin the CPU wheel (never pull the multi-GB
	@# CUDA wheels onto a CPU machine through an unpinned requirement).
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "setup: keeping the installed CUDA build of torch"; \
	else \
		$(PIP) install -q "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(PIP) install -q "setuptools>=64" "pybind11>=2.12" ninja "triton>=3.2"
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	@touch $@

test: setup
	$(PYTHON) -m pytest -q

check: setup
	$(PYTHON) -m transformer_kernels check

bench: setup
	$(PYTHON) -m transformer_kernels bench

info: setup
	$(PYTHON) -m transformer_kernels info

lint: setup
	$(PYTHON) -m ruff check .

clean:
	rm -rf build *.egg-info .setup-stamp transformer_kernels/*.so
