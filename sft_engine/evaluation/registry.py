"""The registry of evaluation suites: the one list the config, scoring, decontamination, the gate and the sweep read.

- ``BUILT_IN``: the suites the pipeline ships, in scoring order; each is configured by its section ``evaluate.<kind>``.
- ``FROM_FILES``: the kinds of a team's own suite (``evaluate.suites``), each read from a file.

Adding a built-in suite is one module (a ``Suite`` subclass with its ``Settings``) and one entry in ``BUILT_IN``;
its config section, decontamination, the results table, the gate and the sweep pick it up from here.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field

from sft_engine.evaluation.conversation_loss import LossSuite
from sft_engine.evaluation.files import FileSuite
from sft_engine.evaluation.generation import GenerationSuite
from sft_engine.evaluation.heldout import HeldoutLoss
from sft_engine.evaluation.ifbench import IFBench
from sft_engine.evaluation.knowledge import Knowledge
from sft_engine.evaluation.multiple_choice import MultipleChoiceSuite
from sft_engine.evaluation.suite import Metric, Suite
from sft_engine.evaluation.verifiable import Verifiable

BUILT_IN: tuple[type[Suite], ...] = (HeldoutLoss, Knowledge, IFBench, Verifiable)
FROM_FILES: tuple[type[FileSuite], ...] = (GenerationSuite, MultipleChoiceSuite, LossSuite)

BUILTIN_SUITES = {cls.kind: cls for cls in BUILT_IN}
FILE_KINDS = {cls.kind: cls for cls in FROM_FILES}

# An entry of evaluate.suites: the settings of one of the FROM_FILES kinds, told apart by its `kind`.
FileSuiteConfig = Annotated[Union[tuple(cls.Settings for cls in FROM_FILES)], Field(discriminator="kind")]  # type: ignore[valid-type] # noqa: UP007 (built from the registry)


def configured_suites(evaluate: Any) -> list[Suite]:
    """The suites an ``evaluate`` config scores, in order: the enabled built-ins, then the team's own."""
    built = [cls(cls.kind, getattr(evaluate, cls.kind)) for cls in BUILT_IN]
    own = [FILE_KINDS[s.kind](s.name, s) for s in evaluate.suites]
    return [s for s in [*built, *own] if s.enabled()]


def metric_specs(evaluate: Any) -> dict[str, Metric]:
    """Every table metric of an ``evaluate`` config (``<suite>.<metric>``) and how it reads."""
    return {f"{s.name}.{name}": m for s in configured_suites(evaluate) for name, m in s.metrics().items()}


def builtin_eval_sets() -> dict[str, Suite]:
    """Every built-in set decontamination can name (``curate.decontaminate.eval_sets[].builtin``) -> its suite."""
    return {name: suite for cls in BUILT_IN for suite in [cls.every_item()] for name in suite.decontam_sets()}


def builtin_texts(name: str) -> list[str]:
    """The text of every item of a built-in set, as decontamination checks it."""
    return builtin_eval_sets()[name].decontam_sets()[name]()


def suite_from_view(view: dict[str, Any]) -> FileSuite:
    """A team's own suite rebuilt from its ``decontam_view`` (the defaults stand in for the scoring settings)."""
    cls = FILE_KINDS[view["kind"]]
    return cls(view["name"], cls.Settings.model_validate(view))
