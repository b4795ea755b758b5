# The two commands of the README: `make demo` runs the whole recipe at toy scale,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; GPU users install their own torch first and run `pip install -e .[test]`.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test clean

# llama.cpp itself, for the tests that load our GGUF in it: llama-cpp-python has no wheel on
# PyPI, so pip builds llama.cpp from source the first time (about 5 minutes on 2 cores) and
# caches the wheel; later installs on the same machine take seconds.
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q -e ".[llamacpp]"
	touch $@

# transformers 4.35 (Chinese-LLaMA-Alpaca-2's pin) in a venv of its own, for the test that
# reads our Hugging Face tokenizer files with it as well as with the installed 5.x; only the
# tokenizer is used, so it needs no torch (about a minute the first time).
TF4_VENV ?= .venv-tf4
$(TF4_VENV)/.installed:
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/python -m pip install -q "transformers==4.35.2" "sentencepiece==0.1.99" \
		"numpy<2" "protobuf==3.20.3" jinja2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/zhllama demo --workdir runs/demo --overwrite

# Under CI (CI=true, as CI services set it) a test whose real test material is missing
# fails instead of skipping, so a green run means every such test ran; set
# ZHLLAMA_REQUIRE_SHARED_DATA=1 to ask for that locally. -rs lists every skip with its reason.
ZHLLAMA_REQUIRE_SHARED_DATA ?= $(if $(filter true 1,$(CI)),1,)
# Most tests wait on processes of one thread each (training runs, torchrun, servers), so two
# workers (pytest-xdist) with one thread each keep both cores busy and halve the wall time;
# 0 runs them in order.
TEST_WORKERS ?= 2

test: $(VENV)/.installed $(VENV)/.llamacpp $(TF4_VENV)/.installed
	ZHLLAMA_REQUIRE_SHARED_DATA=$(ZHLLAMA_REQUIRE_SHARED_DATA) OMP_NUM_THREADS=1 \
		ZHLLAMA_TRANSFORMERS_4_PYTHON=$(abspath $(TF4_VENV))/bin/python $(PY) -m pytest -q -rs \
		-n $(TEST_WORKERS) tests

clean:
	rm -rf runs build *.egg-info .pytest_cache
