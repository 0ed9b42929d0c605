# momentum_fused: `make test` and `make demo` create a venv, install everything and run.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: venv test test-main test-triton demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py momentum_fused/_cpu_build.py requirements-dev.txt $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.inc csrc/*/*.cu csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e . --no-build-isolation
	$(PY) -c "import momentum_fused as m; print('momentum_fused backends:', m.backends.status())"
	touch $@

# The whole suite: the main process, then the Triton-interpreter process (TRITON_INTERPRET must be set
# before triton is imported, so those tests run separately). pytest's exit code 5 (no test collected)
# is a failure here: a suite that silently collects nothing must not pass.
test: venv test-main test-triton

# When the compiled cpu backend is built it is the default for CPU tensors, so the oracle files run a
# second time pinned to the reference backend: the executable spec itself must match torch and goldens.
ORACLE_TESTS = tests/test_parity_torch.py tests/test_goldens.py tests/test_identities.py tests/test_schedulefree.py

test-main: venv
	@$(PY) -m pytest tests --ignore=tests/triton; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	  echo "== oracle tests again on the reference backend"; \
	  MOMENTUM_FUSED_BACKEND=reference $(PY) -m pytest -q $(ORACLE_TESTS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

test-triton: venv
	@if [ -d tests/triton ]; then \
	  TRITON_INTERPRET=1 $(PY) -m pytest tests/triton; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no Triton tests"; exit 1; fi; exit $$rc; \
	fi

# The quick tour (every optimizer trains one small model), then the quick benchmark.
demo: venv
	$(PY) examples/quick_tour.py --steps 200
	$(PY) -m bench --quick --out bench/results/demo
	@echo "benchmark table and plots: bench/results/demo/ (results.md, results.json, results.csv, *.png)"

clean:
	rm -rf $(VENV) build *.egg-info
