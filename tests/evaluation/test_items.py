"""The built-in suites' items come from installed packages, and decontamination checks exactly those items."""

from __future__ import annotations

import pytest

from sft_engine.evaluation.items import ifbench_items, multiple_choice_items, verifiable_items
from sft_engine.evaluation.registry import builtin_eval_sets, builtin_texts


def test_multiple_choice_items_come_from_the_installed_package_with_gold_indices() -> None:
    mmlu = multiple_choice_items("mmlu")
    assert len(mmlu) == 2850
    assert mmlu[0]["choices"] == ["$25000 $25000 $0", "$0 $25000 $20000", "$25000 $5000 $0", "$0 $25000 $0"]
    assert mmlu[0]["gold"] == 3  # "D. $0 $25000 $0"
    piqa = multiple_choice_items("piqa")[0]
    assert (piqa["question"], piqa["choices"], piqa["gold"]) == ("dresser", ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"], 1)
    boolq = multiple_choice_items("boolq")[0]
    assert boolq["choices"] == ["no", "yes"] and boolq["gold"] == 0 and boolq["question"].endswith("Question: does ethanol take more energy make that produces?")
    assert len(multiple_choice_items("commonsenseqa")) == 1220  # one packaged item has no valid answer letter
    with pytest.raises(ValueError, match="unknown multiple-choice set 'mmlu2'; choose from mmlu"):
        multiple_choice_items("mmlu2")


def test_decontamination_checks_the_items_evaluation_scores() -> None:
    # One source of truth: every scored item's text is in what decontamination checks, named as the suites name them.
    assert list(builtin_eval_sets()) == ["mmlu", "openbookqa", "commonsenseqa", "piqa", "siqa", "boolq", "ifbench", "verifiable"]
    texts = builtin_texts("openbookqa")
    first = multiple_choice_items("openbookqa")[0]
    assert texts[0] == f"{first['question']} {first['choices'][first['gold']]}"
    assert builtin_texts("ifbench")[5] == ifbench_items()[5]["prompt"] and len(builtin_texts("ifbench")) == 294
    assert builtin_texts("verifiable")[:3] == [it["prompt"] for it in verifiable_items(3)]
    assert verifiable_items(2)[1]["id"] == "verifiable-1"
