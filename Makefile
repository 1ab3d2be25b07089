# Every target does its own set-up, so `make test` and `make check` work on a fresh machine.
PYTHON ?= python3
# Outside a virtual environment the set-up makes one in the checkout (.venv) and every target runs there: a stock
# Debian/Ubuntu python refuses pip installs into itself (PEP 668, "externally-managed-environment"). The venv sees
# the system's packages, so a preinstalled CUDA build of torch (and triton) is kept and nothing is downloaded twice.
ifeq ($(shell $(PYTHON) -c "import sys; print(int(sys.prefix != sys.base_prefix))"),0)
HOST_PYTHON := $(PYTHON)
override PYTHON := .venv/bin/python
VENV := .venv/bin/python
endif
PIP := $(PYTHON) -m pip --disable-pip-version-check
TORCH_CPU_VERSION := 2.13.0
export TRITON_DEFAULT_FP_FUSION ?= 1

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cu csrc/*.h csrc/*.cuh csrc/*.cpp csrc/host/*)

.PHONY: setup test test-floor check check-resources coverage bench info lint clean gpu-check wheel install-check

# Reinstalls (ninja rebuilds only what changed) when the build inputs are newer than the last install.
setup: .setup-stamp

.venv/bin/python:
	@# Without pip of its own (Debian's python lacks ensurepip unless python3-venv is installed): the system's pip,
	@# seen through the system site packages, installs into the venv; ensurepip only where there is none.
	$(HOST_PYTHON) -m venv --system-site-packages --without-pip .venv
	@.venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip --default-pip

.setup-stamp: $(SOURCES) $(VENV)
	@# Keep a CUDA build of torch if there is one; otherwise pin the CPU wheel (never pull the multi-GB
	@# CUDA wheels onto a CPU machine through an unpinned requirement).
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "setup: keeping the installed CUDA build of torch"; \
	else \
		$(PIP) install -q "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(PIP) install -q "setuptools>=64" "pybind11>=2.12" ninja "triton>=3.6"
	$(PIP) install -q --no-build-isolation -e ".[test,bench,hf]"
	@touch $@

# One pytest worker per CPU, a test file per worker at a time (files own their module fixtures and build folders),
# in collection order: tests/conftest.py puts the long files first.
TEST_WORKERS ?= auto
test: setup
	$(PYTHON) -m pytest -q -p no:benchmark -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The floors of the supported ranges, proven: every op family's interpreted Triton tests under triton $(TRITON_FLOOR),
# and the Hugging Face tests under the oldest transformers the `hf` extra admits (read from pyproject.toml), in a second
# environment that borrows everything else (torch, pytest, the built extensions) from the main one. The HF training
# curves stay in `make test` alone (4 of its 5 minutes); logits, every gradient, generation and compile run here.
# triton 3.6's interpreter reads loop bounds with int() of a one-element array, which numpy >= 2.3 refuses.
TRITON_FLOOR := 3.6.0
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR := .venv-floor/bin/python
test-floor: setup
	@test -x $(FLOOR) || $(PYTHON) -m venv --without-pip .venv-floor
	@$(PYTHON) -c "import site; print('\n'.join(site.getsitepackages()))" \
		> "$$($(FLOOR) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_main_environment.pth"
	$(FLOOR) -m pip install -q --disable-pip-version-check "triton==$(TRITON_FLOOR)" "numpy<2.3" \
		"transformers==$(TRANSFORMERS_FLOOR)"
	$(FLOOR) -c "import triton; assert triton.__version__ == '$(TRITON_FLOOR)', triton.__version__"
	$(FLOOR) -c "from packaging.version import Version as V; import transformers as t; \
		assert V(t.__version__) == V('$(TRANSFORMERS_FLOOR)'), t.__version__"
	PYTHONPATH="$(CURDIR)" $(FLOOR) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
		tests/test_softmax.py tests/test_norm.py tests/test_linear.py tests/test_attention.py tests/test_backends.py \
		tests/test_rotary.py tests/test_cross_entropy.py tests/test_flash_attn_interface.py \
		-k "(triton and not long) or gqa_decoding"
	PYTHONPATH="$(CURDIR)" $(FLOOR) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
		tests/test_attention_backward.py tests/test_attention_lse.py tests/test_attention_features.py \
		tests/test_attention_window.py tests/test_attention_alibi.py tests/test_kvcache.py -k "triton or backward or kvcache"
	PYTHONPATH="$(CURDIR)" $(FLOOR) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
		tests/test_huggingface.py tests/test_layout.py -k "not training_curve"

check: setup
	$(PYTHON) -m transformer_kernels check

# A binary wheel in dist/: _C for TK_CUDA_ARCHS (default 80;86;89;90) plus PTX of the newest, _C_host, the Triton
# kernels and the committed resource table. It links no libtorch and a static cudart: one wheel per Python version.
wheel: setup
	rm -rf dist
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist .

# The install routes users take, each into a fresh environment (that sees only the system's packages, none of
# .venv's) and run from outside the checkout, so nothing is imported from the source tree:
# 1. the wheel, non-editable; `check --quick` on every backend it carries;
# 2. `pip install <checkout>` (build isolation, as users run it) with no CUDA toolkit visible (TK_NO_CUDA_TOOLKIT=1:
#    the toolkit lookup answers "none", the same code path as a machine without one): both C++ modules skipped with
#    one line each, then the Triton (interpreted) and torch backends against the reference;
# 3. the sdist (below).
INSTALL_CHECK := $(CURDIR)/build/install-check
ENV_PIP = $(INSTALL_CHECK)/$(1)/bin/python -m pip install -q --disable-pip-version-check
# A fresh environment $(INSTALL_CHECK)/<name> holding the CPU torch wheel (never a CUDA one on this machine).
fresh_env = $(PYTHON) -m venv --system-site-packages --without-pip $(INSTALL_CHECK)/$(1) \
	&& $(call ENV_PIP,$(1)) "torch==$(TORCH_CPU_VERSION)"
install-check: wheel
	rm -rf $(INSTALL_CHECK) && mkdir -p $(INSTALL_CHECK)
	$(call fresh_env,wheel)
	$(call ENV_PIP,wheel) $(CURDIR)/dist/*.whl
	cd $(INSTALL_CHECK) && wheel/bin/python -m transformer_kernels info
	cd $(INSTALL_CHECK) && wheel/bin/python -m transformer_kernels check --quick
	$(call fresh_env,no-toolkit)
	@# A copy of the checkout's files as a clone has them (no build/ with earlier extensions in it); tar keeps the link.
	mkdir -p $(INSTALL_CHECK)/clone && git ls-files -z --cached --others --exclude-standard \
		| tar --null -T - -cf - | tar -xf - -C $(INSTALL_CHECK)/clone
	TK_NO_CUDA_TOOLKIT=1 $(INSTALL_CHECK)/no-toolkit/bin/python -m pip install -v --disable-pip-version-check \
		$(INSTALL_CHECK)/clone 2>&1 | tee $(INSTALL_CHECK)/no-toolkit.log | grep "transformer-kernels:" || true
	grep -q "not building _C_host" $(INSTALL_CHECK)/no-toolkit.log
	cd $(INSTALL_CHECK) && no-toolkit/bin/python -m transformer_kernels info
	cd $(INSTALL_CHECK) && no-toolkit/bin/python -m transformer_kernels.tools.install_smoke
	@# 3. the sdist, built from the checkout and installed with the toolkit (every csrc header must be in it); the
	@#    simulator only (TK_SKIP_CUDA_BUILD=1): nvcc's part of the build is the wheel's, above.
	$(PYTHON) setup.py -q sdist -d $(INSTALL_CHECK)/sdist > $(INSTALL_CHECK)/sdist.log 2>&1
	$(call fresh_env,from-sdist)
	TK_SKIP_CUDA_BUILD=1 $(call ENV_PIP,from-sdist) $(INSTALL_CHECK)/sdist/*.tar.gz
	cd $(INSTALL_CHECK) && from-sdist/bin/python -m transformer_kernels --version
	cd $(INSTALL_CHECK) && from-sdist/bin/python -m transformer_kernels.tools.install_smoke --with-simulator

# Every Triton variant and CUDA C++ kernel compiled again for the target arches (no GPU needed): fails on a spill and
# rewrites kernels/aot_resources.json, the committed table from which `make test` reads the variants whose kernels
# did not change. Run it after changing a kernel and commit the table (with 2 cores: about 15 minutes).
check-resources: setup
	$(PYTHON) -m transformer_kernels.tools.resources --recompile --update-table --check

# The suite with line coverage of the Triton kernels (coverage.py over the interpreted kernels/*.py) and of csrc/
# (gcov, through a copy of _C_host built instrumented in build/coverage); prints the two figures last.
coverage: setup
	$(PIP) install -q "coverage>=7" "gcovr>=7"
	$(PYTHON) -m transformer_kernels.tools.coverage

bench: setup
	$(PYTHON) -m transformer_kernels bench
	$(PYTHON) -m transformer_kernels bench --host

# On a GPU machine with a CUDA torch and triton preinstalled and no network: install this package without touching
# its dependencies, then every GPU verification and the quick benchmarks (tools/gpu_check.py) into $(OUT).
# DRY_RUN=1 only lists the steps (anywhere, no GPU needed); RESUME=<results.csv> skips the benchmark cases it holds.
OUT ?= gpu_check
gpu-check: $(VENV)
ifdef DRY_RUN
	$(PYTHON) -m transformer_kernels.tools.gpu_check --dry-run --out $(OUT)
else
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m transformer_kernels.tools.gpu_check --out $(OUT) $(if $(RESUME),--resume $(RESUME))
endif

info: setup
	$(PYTHON) -m transformer_kernels info

lint: setup
	$(PYTHON) -m ruff check .

clean:
	rm -rf build dist *.egg-info .setup-stamp transformer_kernels/*.so .venv .venv-floor
