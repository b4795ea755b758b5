# The two commands of the README: `make demo` runs the whole recipe at toy scale,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; GPU users install their own torch first and run `pip install -e .[test]`.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-llamacpp clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m train.recipe --workdir runs/demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# llama.cpp itself (llama-cpp-python builds it from source: 5-8 minutes on 2 cores, once;
# pip caches the wheel). Not part of `make test`, whose llama.cpp tests skip without it.
test-llamacpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q llama-cpp-python
	$(PY) -m pytest -q -m llamacpp tests

clean:
	rm -rf runs build *.egg-info .pytest_cache
