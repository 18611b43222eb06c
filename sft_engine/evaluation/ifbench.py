"""The ``ifbench`` suite, instruction following: IFBench prompts scored by the ``if-verifiable`` rule checkers.

Reported like IFEval: prompt-level accuracy (every instruction of a prompt passes) and
instruction-level accuracy (passes over all instructions), each strict (the response as is) and
loose (also accepted after stripping markdown asterisks or the first/last line).

A few checkers use NLTK data (``punkt_tab`` sentence splitting, the English stopword list, the
perceptron POS tagger) that cannot be installed offline; the checker modules would try to download it
at import. Where the data is missing we give those modules working replacements instead of skipping
rules: NLTK's own data-free tokenizers (an untrained Punkt splitter and the Treebank word
tokenizer), a stopword list, and a lexicon test for "starts with a verb". Only the modules'
reference to ``nltk`` is swapped; the ``nltk`` package itself is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from pydantic import Field

from sft_engine.evaluation.items import IFBENCH, ifbench_items
from sft_engine.evaluation.suite import Metric, Scorer, Suite, SuiteResult, binomial_stderr
from sft_engine.fields import Strict, keyed

_RESOURCES = ("tokenizers/punkt_tab", "corpora/stopwords", "taggers/averaged_perceptron_tagger_eng")

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both but
    by can could did do does doing down during each few for from further had has have having he her here hers herself him
    himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or other
    our ours ourselves out over own same she should so some such than that the their theirs them themselves then there
    these they this those through to too under until up very was we were what when where which while who whom why will
    with would you your yours yourself yourselves""".split()  # noqa: SIM905 (a word block reads better than 130 quoted words)
)

# Verbs a response plausibly opens with (mostly imperatives), for the "starts with a verb" rule.
_VERBS = frozenset(
    """accept add allow answer apply arrange ask avoid be begin believe bring build buy calculate call can check choose
    clean close come compare compose consider continue convert could create cut decide define describe design determine
    develop discover discuss do draft draw drink drive eat enjoy ensure enter estimate examine explain explore feel fill
    find finish fix focus follow forget gather get give go grab grow guess have head hear help hold identify imagine
    implement improve include increase install is join jump keep know launch lead learn leave let list listen
    live look love make manage mark measure meet mix move need note notice open order organize pack paint pay pick place
    plan play practice prepare press print protect provide pull push put read recall receive recommend remember remove
    repeat replace reply research rest return review run save say see select sell send set share show sing sit sleep
    solve sort speak spend stand start stay stop study submit summarize take talk taste teach tell test think track try
    turn understand use verify visit wait walk want was wash watch wear were will work would write""".split()  # noqa: SIM905
)


def _nltk_data_missing() -> bool:
    import nltk

    for path in _RESOURCES:
        try:
            nltk.data.find(path)
        except LookupError:
            return True
    return False


def _fallback_nltk(nltk: ModuleType) -> SimpleNamespace:
    """An object standing in for the ``nltk`` module inside the checker modules."""
    sentences = nltk.tokenize.PunktSentenceTokenizer()  # untrained: splits on . ! ? without data files
    words = nltk.tokenize.NLTKWordTokenizer()

    def word_tokenize(text: str, *_: Any, **__: Any) -> list[str]:
        return [w for s in sentences.tokenize(text) for w in words.tokenize(s)]

    def pos_tag(tokens: list[str], *_: Any, **__: Any) -> list[tuple[str, str]]:
        return [(t, "VB" if t.lower() in _VERBS else "NN") for t in tokens]

    stopwords = SimpleNamespace(words=lambda *_: sorted(STOPWORDS))
    corpus = SimpleNamespace(stopwords=stopwords)
    return SimpleNamespace(
        word_tokenize=word_tokenize, sent_tokenize=sentences.tokenize, pos_tag=pos_tag, ngrams=nltk.ngrams,
        tokenize=nltk.tokenize, corpus=corpus, data=nltk.data,
    )


@cache
def registry() -> dict[str, Any]:
    """IFBench's instruction id -> checker class, with NLTK fallbacks installed where the data is missing."""
    import nltk

    missing = _nltk_data_missing()
    if missing:
        # The checker module calls nltk.download at import; offline that only prints errors.
        real_download, nltk.download = nltk.download, lambda *a, **k: False
    try:
        from if_verifiable.ifbench import instructions, instructions_registry, instructions_util
    finally:
        if missing:
            nltk.download = real_download
    if missing:
        fallback = _fallback_nltk(nltk)
        instructions.nltk = fallback
        instructions_util.nltk = fallback
        instructions_util._get_sentence_tokenizer = lambda: nltk.tokenize.PunktSentenceTokenizer()
    return dict(instructions_registry.INSTRUCTION_DICT)


def check_response(item: dict[str, Any], response: str) -> list[dict[str, Any]]:
    """Strict and loose pass of each of the item's instructions on ``response``.

    Raises:
        KeyError: an instruction id this version of the checkers does not know (so no rule is silently skipped).
    """
    from if_verifiable.common import evaluate_instructions

    reg = registry()
    unknown = [i for i in item["instruction_id_list"] if i not in reg]
    if unknown:
        raise KeyError(f"IFBench item {item['id']}: no checker for {unknown}; pin if-verifiable==0.1.2")
    results, _ = evaluate_instructions(
        response=response, instruction_id_list=item["instruction_id_list"], kwargs_list=item["kwargs"],
        prompt=item["prompt"], instruction_registry=reg,
    )
    if not results:  # empty response: evaluate_instructions returns nothing; every instruction failed
        return [{"instruction_id": i, "strict": False, "loose": False} for i in item["instruction_id_list"]]
    return [{"instruction_id": r.instruction_id, "strict": r.strict_pass, "loose": r.loose_pass} for r in results]


def score_ifbench(items: list[dict[str, Any]], responses: list[str], suite: str = "ifbench") -> tuple[dict[str, float], list[dict[str, Any]]]:
    """IFEval-style accuracies over ``items`` and one record per item with its per-instruction results."""
    records = []
    for item, response in zip(items, responses, strict=True):
        checks = check_response(item, response)
        records.append({
            "suite": suite, "id": item["id"], "response": response, "instructions": checks,
            "prompt_strict": all(c["strict"] for c in checks), "prompt_loose": all(c["loose"] for c in checks),
        })
    n = len(records)
    flat = [c for r in records for c in r["instructions"]]
    scores: dict[str, float] = {"n": float(n)}
    for mode in ("strict", "loose"):
        p = sum(r[f"prompt_{mode}"] for r in records) / n if n else float("nan")
        scores[f"prompt_{mode}"] = p
        scores[f"prompt_{mode}_stderr"] = binomial_stderr(p, n)
        scores[f"instruction_{mode}"] = sum(c[mode] for c in flat) / len(flat) if flat else float("nan")
    return scores, records



class IFBenchSettings(Strict):
    """IFBench prompts, answered greedily and scored by the rule checkers."""

    limit: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=50, ge=0, le=294,
                       description="IFBench prompts scored by rule checkers (0 = off).")
    max_new_tokens: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=256, ge=1,
                                description="Generation cap for IFBench answers.")


class IFBench(Suite):
    kind = "ifbench"
    Settings = IFBenchSettings
    settings: IFBenchSettings

    def enabled(self) -> bool:
        return self.settings.limit > 0

    def packages(self) -> list[tuple[str, str, str]]:
        return [(*IFBENCH, f"evaluate.{self.name}.limit")]

    def metrics(self) -> dict[str, Metric]:
        prompt = "binomial: sqrt(p(1-p)/(n-1)) over prompts"
        return {"prompt_strict": Metric(stderr=prompt), "prompt_loose": Metric(stderr=prompt),
                "instruction_strict": Metric(stderr="none (instructions of one prompt are not independent)"),
                "instruction_loose": Metric(stderr="none (instructions of one prompt are not independent)")}

    def decontam_sets(self) -> dict[str, Callable[[], list[str]]]:
        return {self.name: lambda: [it["prompt"] for it in ifbench_items()]}

    def identity(self, heldout: Path) -> Any:
        import importlib.metadata

        return [importlib.metadata.version(p) for p in ("nvidia-ifbench", "if-verifiable")]

    def score(self, scorer: Scorer) -> SuiteResult:
        from sft_engine.evaluation.generation import generate

        items = list(ifbench_items()[: self.settings.limit])
        chats = [[{"role": "user", "content": it["prompt"]}] for it in items]
        responses = generate(scorer.model, scorer.tokenizer, chats, self.settings.max_new_tokens, scorer.gen_batch_size)
        scores, records = score_ifbench(items, responses, self.name)
        paired = {f"prompt_{m}": ([float(r[f"prompt_{m}"]) for r in records], [1.0] * len(records)) for m in ("strict", "loose")}
        return SuiteResult(scores, records, paired)
