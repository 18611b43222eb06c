"""The one interface every evaluation suite implements, built-in or a team's own.

A suite has a name (the prefix of its metrics: ``<suite>.<metric>``), its items, the texts decontamination must
check, and ``score(scorer) -> SuiteResult``. Per metric it declares whether lower is better and how its standard
error is computed (``Metric``); the results table, the gate and the sweep's leaders read those declarations through
``sft_engine.evaluation.registry``, so no list of metric directions is written anywhere else.

Heavy imports (torch, transformers, lm-eval) stay inside the functions that need them: the config imports the
suites' settings, and loading a config must stay quick.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from sft_engine.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class SuiteError(UserError, ValueError):
    """A suite's input that cannot be scored (a missing file or field, a choice index out of range, a checker that
    cannot be imported); raised before any model is loaded, naming the suite, the file and the item (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Metric:
    """How one metric reads: its direction, how its standard error is computed, and what it is for.

    ``compare``: shown in sweep comparisons (False for a metric that is a function of another, like perplexity).
    ``forgetting``: a knowledge-retention accuracy that ``gate.max_knowledge_drop`` guards.
    """

    lower_is_better: bool = False
    stderr: str = "binomial: sqrt(p(1-p)/(n-1)) over items"
    compare: bool = True
    forgetting: bool = False


@dataclass
class SuiteResult:
    """``metrics``: metric name (no suite prefix) -> value, with ``<name>_stderr`` and counts beside;
    ``records``: one per scored item; ``paired``: metric -> (per-item values, per-item weights) in item order, so
    base and tuned scored on the same items get the standard error of their difference (see ``paired_delta_stderr``)."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    paired: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


@dataclass
class Scorer:
    """What a suite scores with: one model and its tokenizer, the evaluate stage's shared settings, the held-out
    rows packed for this model's tokenizer, and a scratch folder inside the suite's (atomic) output folder."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    micro_batch_size: int
    gen_batch_size: int
    heldout: Path
    scratch: Path


class Suite:
    """Base of every suite. Subclasses set ``kind`` and implement ``metrics`` and ``score``; the others have defaults.

    A built-in suite is built from its section of ``evaluate`` (``evaluate.<name>``); a team's own from an entry of
    ``evaluate.suites``. Either way ``settings`` is that pydantic model, whose fields carry their cache markers.
    """

    kind: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]

    def __init__(self, name: str, settings: BaseModel) -> None:
        self.name = name
        self.settings = settings

    @classmethod
    def every_item(cls) -> Suite:
        """The suite with default settings widened to every set it can score (what decontamination may name)."""
        return cls(cls.kind, cls.Settings())

    def enabled(self) -> bool:
        """False when the settings turn the suite off (a limit of 0, no sets)."""
        return True

    def check(self) -> None:
        """Raise ``SuiteError`` on input that cannot be scored. Runs before any model is loaded."""

    def packages(self) -> list[tuple[str, str, str]]:
        """(import name, pip spec, config key) of each package holding the suite's data."""
        return []

    def metrics(self) -> dict[str, Metric]:
        """The metrics the suite reports (no suite prefix) and how each reads."""
        raise NotImplementedError

    def decontam_sets(self) -> dict[str, Callable[[], list[str]]]:
        """Set name -> the texts of every item, as decontamination checks them ({} = nothing to check)."""
        return {}

    def identity(self, heldout: Path) -> Any:
        """The contents the scores depend on besides the settings and the model (file digests, package versions)."""
        return None

    def score(self, scorer: Scorer) -> SuiteResult:
        """Score one model on every item."""
        raise NotImplementedError


# ---- standard errors ---------------------------------------------------------------------------------------------


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a mean of ``n`` 0/1 outcomes (sample variance, as lm-eval reports)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample variance); for 0/1 values the stderr equals ``binomial_stderr``."""
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def ratio_stderr(values: list[float], weights: list[float]) -> float:
    """Standard error of the ratio estimator sum(values) / sum(weights), items as the sampling unit."""
    k = len(values)
    if k < 2 or not sum(weights):
        return float("nan")
    mean = sum(values) / sum(weights)
    var = sum((v - mean * w) ** 2 for v, w in zip(values, weights, strict=True)) / (k - 1)
    return math.sqrt(var) / (sum(weights) / k * math.sqrt(k))


def paired_delta_stderr(tuned: tuple[list[float], list[float]], base: tuple[list[float], list[float]]) -> float | None:
    """Standard error of tuned - base on the same items: the ratio estimator of the per-item differences (far smaller
    than either model's own stderr, since the items' difficulty cancels). None when the two were not scored on the
    same items (their weights differ, e.g. a different tokenizer packed the held-out rows differently)."""
    (vt, wt), (vb, wb) = tuned, base
    if wt != wb or len(wt) < 2:
        return None
    return ratio_stderr([a - b for a, b in zip(vt, vb, strict=True)], wt)


@contextlib.contextmanager
def inference_precision(precision: str) -> Iterator[None]:
    """Scoring forwards in fp32, or under bf16 autocast (``evaluate.precision: bf16``: about 1.7x faster on CPUs with
    avx512_bf16; base and tuned are scored the same way, so their comparison stays fair)."""
    if precision != "bf16":
        yield
        return
    import torch

    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16):
        yield
