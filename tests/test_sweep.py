"""Mix sweeps: variant expansion, the token budget, the noise-aware comparison, and a real sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sft_engine.config import SweepConfig, config_to_dict, load_config
from sft_engine.evaluation.registry import metric_specs
from sft_engine.sweep import Variant, comparison_rows, expand_variants, leaders, markdown, steps_for_budget, variant_config

SOURCES = "curate.sources=[{name: tasks, builtin: verifiable_tasks, limit: 160}, {name: chat, builtin: chitchat, limit: 40}]"
SUPPORT_SUITE = f"evaluate.suites=[{{name: support, kind: loss, path: {Path(__file__).parent / 'data' / 'suites' / 'support_chats.jsonl'}}}]"


def _base(tmp_path: Path, model: str = "smollm2-135m", *extra: str) -> dict:
    return config_to_dict(load_config(None, [f"work_dir={tmp_path / 'work'}", f"model={model}", SOURCES, *extra]))


def test_variants_expand_in_a_stable_order_with_readable_names(tmp_path: Path) -> None:
    sweep = SweepConfig(
        variants=[{"name": "more_chat", "overrides": ["curate.sources.1.weight=3"]}],
        grid={"curate.sources.0.weight": [0.5, 2]}, leave_one_out=True,
    )
    got = expand_variants(_base(tmp_path), sweep)
    assert got == [
        Variant("baseline"), Variant("more_chat", ("curate.sources.1.weight=3",)),
        Variant("tasks.weight=0.5", ("curate.sources.0.weight=0.5",)), Variant("tasks.weight=2", ("curate.sources.0.weight=2",)),
        Variant("without_tasks", drop_sources=("tasks",)), Variant("without_chat", drop_sources=("chat",)),
    ]
    with pytest.raises(ValueError, match="two variants are named 'baseline'"):
        expand_variants(_base(tmp_path), SweepConfig(variants=[{"name": "baseline"}]))


def test_variant_config_applies_overrides_drops_sources_and_the_token_budget(tmp_path: Path) -> None:
    base = _base(tmp_path, "smollm2-135m", "prepare.max_seq_len=256", "train.grad_accum=2", "train.micro_batch_size=2")
    sweep = SweepConfig(token_budget=10_000)
    cfg = variant_config(base, sweep, Variant("without_chat", ("train.lr=1e-3",), ("chat",)))
    assert [s.name for s in cfg.curate.sources] == ["tasks"] and cfg.train.lr == 1e-3
    assert cfg.train.max_steps == steps_for_budget(cfg, 10_000) == 10  # ceil(10000 / (256 * 2 * 2))
    assert cfg.sweep is None
    with pytest.raises(ValueError, match="drops unknown sources"):
        variant_config(base, sweep, Variant("x", drop_sources=("nope",)))


def test_comparison_marks_leads_within_noise_with_each_metrics_direction() -> None:
    specs = metric_specs(load_config(None, [SOURCES, SUPPORT_SUITE]).evaluate)
    base = {"verifiable.exact_match": 0.10, "verifiable.exact_match_stderr": 0.03, "heldout.loss": 2.0, "heldout.loss_stderr": 0.01,
            "heldout.perplexity": 7.39, "support.loss": 3.0, "support.loss_stderr": 0.1}
    results = {
        "a": {"shares": {"tasks": 0.5, "chat": 0.5}, "tokens": 1000,
              "scores": {"verifiable.exact_match": 0.50, "verifiable.exact_match_stderr": 0.05, "heldout.loss": 1.50, "heldout.loss_stderr": 0.01,
                         "support.loss": 2.9, "support.loss_stderr": 0.1}},
        "b": {"shares": {"tasks": 1.0}, "tokens": 1000,
              "scores": {"verifiable.exact_match": 0.45, "verifiable.exact_match_stderr": 0.05, "heldout.loss": 1.60, "heldout.loss_stderr": 0.01,
                         "support.loss": 2.2, "support.loss_stderr": 0.1}},
    }
    rows = comparison_rows(results, base, specs)
    assert [r["variant"] for r in rows] == ["base", "a", "b"]
    assert [k for k in rows[0] if not k.endswith(("_stderr", "_delta_vs_base"))] == [
        "variant", "share.chat", "share.tasks", "tokens", "heldout.loss", "verifiable.exact_match", "support.loss",
    ]  # perplexity is a function of the loss: not compared
    assert rows[2]["share.chat"] == 0.0 and rows[1]["verifiable.exact_match_delta_vs_base"] == pytest.approx(0.40)
    lead = {x["metric"]: x for x in leaders(rows, specs)}
    # 0.05 apart with a difference stderr of 0.0707: within noise. Loss 0.10 apart, stderr 0.0141: a real lead.
    assert (lead["verifiable.exact_match"]["best"], lead["verifiable.exact_match"]["significant"]) == ("a", False)
    assert (lead["heldout.loss"]["best"], lead["heldout.loss"]["significant"]) == ("a", True)
    assert lead["heldout.loss"]["lead"] == pytest.approx(0.10)
    # The team's own loss suite: lower is better, so b leads by 0.7 (stderr 0.141).
    assert (lead["support.loss"]["best"], lead["support.loss"]["lower_is_better"], lead["support.loss"]["significant"]) == ("b", True, True)
    md = markdown(rows, leaders(rows, specs), specs)
    assert "| variant | chat % | tasks % | tokens | heldout.loss ↓ | verifiable.exact_match ↑ | support.loss ↓ |" in md
    assert "| a | 50 | 50 | 1,000 | 1.500 ±0.010 | 0.500 ±0.050 | 2.900 ±0.100 |" in md
    assert "- verifiable.exact_match: a leads b by 0.050 (stderr 0.071), within noise: not ranked" in md
    assert "- support.loss: b leads a by 0.700 (stderr 0.141), a lead beyond noise" in md
    # A tie is said as one, not as a lead of 0.
    rows[2]["verifiable.exact_match"] = 0.50
    assert "- verifiable.exact_match: a and b tie at 0.500: not ranked" in markdown(rows, leaders(rows, specs), specs)


@pytest.mark.slow
def test_sweep_end_to_end_then_rerun_with_one_more_variant(prefect_server, tiny_model: Path, tmp_path: Path) -> None:
    from flows.sweep import sft_sweep

    common = [
        f"work_dir={tmp_path / 'work'}", f"model={tiny_model}", "experiment=sweep-test", SOURCES, "curate.heldout_fraction=0.1",
        "prepare.max_seq_len=256", "train.grad_accum=2", "train.lr=3e-3", "train.warmup_steps=0",
        "evaluate.knowledge.sets=[boolq]", "evaluate.knowledge.limit=3", "evaluate.ifbench.limit=2",
        "evaluate.ifbench.max_new_tokens=4", "evaluate.verifiable.limit=3", "evaluate.samples.max_new_tokens=4", "evaluate.verifiable.max_new_tokens=4", "evaluate.samples.n=1",
        "evaluate.gate.max_knowledge_drop=null", "evaluate.gate.heldout_loss_must_drop=false",
        SUPPORT_SUITE, "sweep.baseline=false", "sweep.leave_one_out=true", "sweep.token_budget=1024",
        "sweep.variants=[{name: more_tasks, overrides: [curate.sources.0.weight=2]}]",
    ]
    cfg = load_config(None, common)
    result = sft_sweep(config=config_to_dict(cfg))

    names = ["more_tasks", "without_tasks", "without_chat"]
    assert [r["variant"] for r in result["rows"]] == ["base", *names]
    assert {v["steps"] for v in result["variants"].values()} == {2}  # 1024 tokens / (256 x 1 x 2)
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri())
    sweep_run = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([sweep_run.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep_run.info.run_id}'")
    variant_runs = {r.data.tags["sft.sweep_variant"]: r for r in children if "sft.sweep_variant" in r.data.tags}
    assert sorted(variant_runs) == sorted(names)
    # Same held-out split and items for every variant: the base model scores identically under each.
    base_loss = {r.data.metrics["eval/heldout.loss/base"] for r in variant_runs.values()}
    assert len(base_loss) == 1
    for name, r in variant_runs.items():
        assert r.data.metrics["eval/heldout.loss/tuned"] == result["rows"][1 + names.index(name)]["heldout.loss"]
    # Realized proportions: without_chat trains on tasks only.
    without_chat = next(r for r in result["rows"] if r["variant"] == "without_chat")
    assert (without_chat["share.tasks"], without_chat["share.chat"]) == (1.0, 0.0)
    artifacts = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert {"comparison.csv", "comparison.json", "comparison.md", "leaders.json", "sweep_metrics.png", "sweep_shares.png"} <= artifacts
    csv_head = (Path(result["output_dir"]) / "comparison.csv").read_text().splitlines()[0].split(",")
    assert csv_head[:4] == ["variant", "share.chat", "share.tasks", "tokens"] and "heldout.loss_stderr" in csv_head
    # The team's own loss suite is compared like the built-ins, lower being better.
    lead = {x["metric"]: x for x in result["leaders"]}
    losses = {r["variant"]: r["support.loss"] for r in result["rows"] if r["variant"] != "base"}
    assert lead["support.loss"]["lower_is_better"] is True and lead["support.loss"]["best"] == min(losses, key=losses.__getitem__)
    assert "support.loss ↓" in (Path(result["output_dir"]) / "comparison.md").read_text()

    # One more variant, two at a time on a local 2-worker Dask cluster: every earlier variant is reused,
    # only the new one trains (in a Dask worker process).
    more = load_config(None, [*common, "sweep.max_concurrent=2", "sweep.runner=dask",
                              ("sweep.variants=[{name: more_tasks, overrides: [curate.sources.0.weight=2]}, "
                               "{name: lr_low, overrides: [train.lr=1e-3]}]")])
    again = sft_sweep(config=config_to_dict(more))
    assert [r["variant"] for r in again["rows"]] == ["base", "more_tasks", "lr_low", "without_tasks", "without_chat"]
    runs = client.search_runs([sweep_run.info.experiment_id], f"tags.mlflow.parentRunId = '{again['mlflow_run_id']}'")
    train_cached = {}
    for r in runs:
        if "sft.sweep_variant" in r.data.tags:
            (train,) = client.search_runs([sweep_run.info.experiment_id],
                                          f"tags.mlflow.parentRunId = '{r.info.run_id}' and tags.`sft.stage` = 'train'")
            train_cached[r.data.tags["sft.sweep_variant"]] = train.data.tags["cached"]
    assert train_cached == {"more_tasks": "true", "without_tasks": "true", "without_chat": "true", "lr_low": "false"}
    assert json.loads((Path(again["output_dir"]) / "comparison.json").read_text()) == again["rows"]


def test_no_grid_adds_no_variant(tmp_path: Path) -> None:
    assert expand_variants(_base(tmp_path), SweepConfig(leave_one_out=True, baseline=False)) == [
        Variant("without_tasks", drop_sources=("tasks",)), Variant("without_chat", drop_sources=("chat",))
    ]
