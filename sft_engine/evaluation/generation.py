"""Greedy generation, and the ``generation`` kind of a team's own suite: prompts with reference answers.

A ``generation`` suite reads a JSONL/JSON/Parquet file whose rows hold a prompt (a string, or a messages list
``[{role, content}]`` ending with a user turn) and a reference answer, generates greedily with the model's chat
template, and scores each response with one check (``metric``):

- ``exact_match``: the normalized response (or the part ``extract`` pulls out) equals the normalized answer;
  normalization lowercases, collapses whitespace, and strips leading/trailing whitespace, punctuation and quotes;
- ``contains``: the normalized answer occurs in the normalized response;
- ``regex``: the answer field is a pattern, found (``re.search``) in the response;
- ``numeric``: the last number in the response (commas ignored) is within ``tolerance`` of the answer;
- ``python:package.module:function``: ``function(response, item)`` returns a bool or a score in [0, 1]; the function
  is imported (never ``eval``), so it must be importable (an installed package, or ``PYTHONPATH``).

The metric is reported as ``<suite>.<metric>`` (``<suite>.score`` for a Python check) with the sample standard
error over items; every item's response and verdict is in ``items.jsonl``.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from sft_engine.evaluation.files import FileSuite, FileSuiteSettings
from sft_engine.evaluation.suite import Metric, Scorer, SuiteResult, mean_stderr
from sft_engine.fields import keyed

if TYPE_CHECKING:
    import polars as pl
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Chat = list[dict[str, str]]


def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Chat], max_new_tokens: int,
    batch_size: int = 8, template_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy completions of chat prompts (rendered with the model's chat template), ``batch_size`` at a time.

    Prompts are left-padded so every row's generation starts right after its own prompt; greedy decoding of
    a left-padded batch gives the same text as one prompt at a time (up to float rounding).
    """
    import torch

    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})) for p in prompts]
    out: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = enc.to(model.device)
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                )
                out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def extract_answer(text: str) -> str | None:
    """The first line after the last 'Answer:' (the verifiable tasks' format), or None if absent."""
    if "Answer:" not in text:
        return None
    tail = text.rsplit("Answer:", 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


def generate_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, heldout: pl.DataFrame, n: int,
                     max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers to the first ``n`` held-out prompts (last assistant turn withheld): shown, not scored."""
    out = []
    for msgs in heldout["messages"].to_list()[:n]:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:last]]
        text = generate(model, tokenizer, [prompt], max_new_tokens, 1)[0]
        reference = msgs[last]["content"]
        ref_answer = extract_answer(reference)
        out.append({
            "prompt": prompt[-1]["content"], "reference": reference, "generated": text,
            "exact_answer": None if ref_answer is None else extract_answer(text) == ref_answer,
        })
    return out


# ---- checks ---------------------------------------------------------------------------------------------------------

_EDGES = string.whitespace + string.punctuation + "\u201c\u201d\u2018\u2019"
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def normalize(text: str) -> str:
    """Lowercased, whitespace collapsed, leading and trailing whitespace, punctuation and quotes stripped."""
    return " ".join(text.lower().split()).strip(_EDGES)


def last_number(text: str) -> float | None:
    """The last number in ``text`` (thousands commas ignored), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def load_checker(spec: str) -> Callable[[str, dict[str, Any]], Any]:
    """``package.module:function`` imported; ``ImportError``/``AttributeError``/``TypeError`` when it cannot be."""
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"'{spec}' is not a function")
    return fn


METRIC_CHECKS = ("exact_match", "contains", "regex", "numeric")


class GenerationSuiteSettings(FileSuiteSettings):
    """A team's own generation suite: prompts with reference answers, scored by one check."""

    kind: Literal["generation"] = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"))
    prompt_field: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default="prompt",
                              description="Field with the prompt: a string, or a messages list ending with a user turn.")
    answer_field: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default="answer",
                              description="Field with the reference answer (a pattern for metric regex).")
    metric: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default="exact_match",
                        description="exact_match | contains | regex | numeric | python:package.module:function.")
    tolerance: float = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=1e-6, ge=0,
                             description="metric numeric: largest absolute difference counted as correct.")
    extract: str | None = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=None,
                                description="A regex whose last match (its first group, if it has one) is the answer "
                                "checked, e.g. 'Answer:\\s*(.+)'; no match = wrong. None = the whole response.")
    max_new_tokens: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=64, ge=1)
    system_prompt: str | None = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=None,
                                      description="A system turn put before every prompt that has none.")
    chat_template_kwargs: dict[str, Any] = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default_factory=dict,
                                                 description="Variables passed to the chat template, e.g. {enable_thinking: false}.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v in METRIC_CHECKS or re.fullmatch(r"python:[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            return v
        raise ValueError(f"unknown metric '{v}': use one of {', '.join(METRIC_CHECKS)}, or python:package.module:function")

    @field_validator("extract")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v


class GenerationSuite(FileSuite):
    kind = "generation"
    TEXT_FIELDS = (*FileSuite.TEXT_FIELDS, *("prompt_field", "answer_field", "system_prompt"))
    Settings = GenerationSuiteSettings
    settings: GenerationSuiteSettings

    @property
    def metric_name(self) -> str:
        return "score" if self.settings.metric.startswith("python:") else self.settings.metric

    def metrics(self) -> dict[str, Metric]:
        return {self.metric_name: Metric(stderr="sample stderr over items (binomial for 0/1 checks)")}

    def chats(self) -> list[Chat]:
        """Every item's prompt as a chat, with the system prompt where the item has none."""
        out = []
        for i, item in enumerate(self.raw_items()):
            prompt = self.field(item, i, self.settings.prompt_field)
            if isinstance(prompt, str):
                chat = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
            ):
                chat = [{"role": m["role"], "content": m["content"]} for m in prompt]
                if chat[-1]["role"] != "user":
                    raise self.fail(f"the prompt's last turn is '{chat[-1]['role']}'; a prompt ends with a user turn", i)
            else:
                raise self.fail(f"'{self.settings.prompt_field}' must be a string or a list of {{role, content}} messages", i)
            if self.settings.system_prompt is not None and chat[0]["role"] != "system":
                chat = [{"role": "system", "content": self.settings.system_prompt}, *chat]
            out.append(chat)
        return out

    def answers(self) -> list[Any]:
        out = []
        for i, item in enumerate(self.raw_items()):
            answer = self.field(item, i, self.settings.answer_field)
            metric = self.settings.metric
            if metric == "numeric" and (isinstance(answer, bool) or last_number(str(answer)) is None):
                raise self.fail(f"answer {answer!r} is not a number (metric numeric)", i)
            if metric == "regex":
                try:
                    re.compile(str(answer))
                except re.error as exc:
                    raise self.fail(f"answer {answer!r} is not a valid regex (metric regex): {exc}", i) from None
            out.append(answer)
        return out

    def checker(self) -> Callable[[str, dict[str, Any]], Any]:
        spec = self.settings.metric.removeprefix("python:")
        try:
            return load_checker(spec)
        except (ImportError, AttributeError, TypeError) as exc:
            raise self.fail(f"the checker '{spec}' cannot be imported ({exc}); install its package or add it to PYTHONPATH") from None

    def check(self) -> None:
        self.chats()
        self.answers()
        if self.settings.metric.startswith("python:"):
            self.checker()

    def decontam_sets(self) -> dict[str, Callable[[], list[str]]]:
        if not self.settings.decontaminate:
            return {}
        return {self.name: lambda: [" ".join([*(m["content"] for m in c if m["role"] != "system"), str(a)])
                                    for c, a in zip(self.chats(), self.answers(), strict=True)]}

    def verdict(self, response: str, answer: Any, item: dict[str, Any], check: Callable[[str, dict[str, Any]], Any] | None) -> tuple[str | None, float]:
        """(the answer checked, its score in [0, 1]) for one response."""
        st = self.settings
        extracted: str | None = response
        if st.extract is not None:
            found = list(re.finditer(st.extract, response))
            extracted = None if not found else (found[-1].group(1) if found[-1].re.groups else found[-1].group(0))
        if check is not None:
            value = check(response, {k: v for k, v in item.items() if k != "_id"})
            if isinstance(value, bool) or (isinstance(value, (int, float)) and 0 <= value <= 1):
                return extracted, float(value)
            raise self.fail(f"the checker returned {value!r}; it must return a bool or a number in [0, 1]")
        if extracted is None:
            return None, 0.0
        if st.metric == "exact_match":
            ok = normalize(extracted) == normalize(str(answer))
        elif st.metric == "contains":
            ok = normalize(str(answer)) in normalize(extracted)
        elif st.metric == "regex":
            ok = re.search(str(answer), extracted) is not None
        else:
            got, want = last_number(extracted), last_number(str(answer))
            ok = got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=st.tolerance)
        return extracted, float(ok)

    def score(self, scorer: Scorer) -> SuiteResult:
        st = self.settings
        chats, answers, items = self.chats(), self.answers(), self.raw_items()
        check = self.checker() if st.metric.startswith("python:") else None
        responses = generate(scorer.model, scorer.tokenizer, chats, st.max_new_tokens, scorer.gen_batch_size, st.chat_template_kwargs)
        records, values = [], []
        for chat, answer, item, response in zip(chats, answers, items, responses, strict=True):
            extracted, value = self.verdict(response, answer, item, check)
            values.append(value)
            records.append({"suite": self.name, "id": item["_id"], "prompt": chat[-1]["content"], "answer": answer,
                            "response": response, "extracted": extracted, self.metric_name: value})
        mean, se = mean_stderr(values)
        metrics = {self.metric_name: mean, f"{self.metric_name}_stderr": se, "n": float(len(values))}
        return SuiteResult(metrics, records, {self.metric_name: (values, [1.0] * len(values))})
