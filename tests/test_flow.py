"""The whole pipeline as Prefect flows on a real temporary server, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sft_engine.config import config_to_dict, load_config
from sft_engine.io import is_complete
from tests.conftest import CHATML

pytestmark = pytest.mark.slow

# Every suite runs, on a few items each, with a gate the random tiny model can pass.
TINY_EVAL = (
    "evaluate.knowledge.sets=[mmlu, boolq]", "evaluate.knowledge.limit=4", "evaluate.ifbench.limit=3",
    "evaluate.ifbench.max_new_tokens=8", "evaluate.verifiable.limit=4", "evaluate.gate.max_knowledge_drop=null",
)


ARITH_SUITE = (f"evaluate.suites=[{{name: arith, kind: generation, path: {Path(__file__).parent / 'data' / 'suites' / 'arithmetic.jsonl'}, "
               "metric: numeric, max_new_tokens: 4}]")


def _cfg_overrides(tmp_path: Path, tiny_model: Path) -> list[str]:
    return [
        f"work_dir={tmp_path / 'work'}", f"model={tiny_model}", "experiment=flow-test",
        "curate.sources=[{name: tasks, builtin: verifiable_tasks, limit: 160}, {name: chat, builtin: chitchat, limit: 40}]",
        "curate.heldout_fraction=0.1", "prepare.max_seq_len=256",
        "train.max_steps=2", "train.grad_accum=2", "train.lr=3e-3", "train.warmup_steps=0",
        "evaluate.samples.n=2", "evaluate.samples.max_new_tokens=4", "evaluate.verifiable.max_new_tokens=4", *TINY_EVAL,
    ]


def _cfg(tmp_path: Path, tiny_model: Path, *extra: str):
    return load_config(None, [*_cfg_overrides(tmp_path, tiny_model), *extra])


def test_pipeline_flow_end_to_end_and_rerun_reuses_stages(prefect_server, tiny_model: Path, tmp_path: Path) -> None:
    from flows.pipeline import sft_pipeline

    cfg = _cfg(tmp_path, tiny_model)
    result = sft_pipeline(config=config_to_dict(cfg))

    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri())
    assert cfg.resolved_tracking_uri().startswith("sqlite:///")
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.zero_stage"] == "2"
    assert parent.data.tags["prefect.flow_run_id"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["sft.stage"]: r for r in children}
    assert sorted(by_stage) == ["curate", "evaluate", "prepare", "train"]
    assert all(r.info.status == "FINISHED" for r in children)

    curate_m = by_stage["curate"].data.metrics
    dropped = sum(v for k, v in curate_m.items() if k.startswith("dropped."))
    assert curate_m["rows_in"] == 200 and curate_m["rows_in"] == curate_m["rows_kept"] + dropped
    assert by_stage["prepare"].data.metrics["train.fill"] > 0.5
    losses = client.get_metric_history(by_stage["train"].info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]
    ev = by_stage["evaluate"].data.metrics
    names = {"heldout.loss", "knowledge.mmlu.acc", "knowledge.boolq.acc_norm", "ifbench.prompt_loose", "verifiable.exact_match"}
    assert {f"eval/{n}/{c}" for n in names for c in ("base", "tuned", "delta")} <= set(ev)
    assert ev["eval/heldout.loss/delta"] == pytest.approx(ev["eval/heldout.loss/tuned"] - ev["eval/heldout.loss/base"])
    assert {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id)} >= {
        "table.csv", "table.json", "items.jsonl", "eval_table.png", "samples.json"
    }
    for name, value in ev.items():
        if name.startswith(("eval/knowledge.", "eval/ifbench.", "eval/verifiable.")) and name.endswith(("/base", "/tuned")):
            assert 0.0 <= value <= 1.0, name
    assert ev["eval/heldout.loss/tuned_stderr"] > 0
    assert [r["metric"] for r in result["table"]] == [
        "heldout.loss", "heldout.perplexity", "knowledge.mmlu.acc", "knowledge.mmlu.acc_norm", "knowledge.boolq.acc",
        "knowledge.boolq.acc_norm", "ifbench.prompt_strict", "ifbench.prompt_loose", "ifbench.instruction_strict",
        "ifbench.instruction_loose", "verifiable.exact_match",
    ]
    assert all(r["base"] is not None and r["delta"] == pytest.approx(r["tuned"] - r["base"]) for r in result["table"])
    assert by_stage["evaluate"].data.tags["sft.gate"] == parent.data.tags["sft.gate"] == "passed"
    assert parent.data.metrics["eval/verifiable.exact_match/tuned"] == ev["eval/verifiable.exact_match/tuned"]

    artifacts = {a.path for a in client.list_artifacts(by_stage["curate"].info.run_id)}
    assert {"stats.json", "drop_reasons.png", "config.json", "lengths_before_after.png", "source_share.png", "report.md", "drop_samples"} <= artifacts
    # The sampled rejected rows per reason, and the page showing them, are in the curate run.
    samples = {a.path for a in client.list_artifacts(by_stage["curate"].info.run_id, "drop_samples")}
    reasons = json.loads((Path(result["curated"]) / "stats.json").read_text())["dropped_by_reason"]
    assert samples == {f"drop_samples/{r}.jsonl" for r in reasons} | {"drop_samples/index.html"}
    curated_stats = json.loads((Path(result["curated"]) / "stats.json").read_text())
    inputs = client.get_run(by_stage["curate"].info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("curated", curated_stats["digest"][:36])]
    assert (Path(result["model"]) / "model.safetensors").is_file()
    stats = json.loads((Path(result["curated"]) / "stats.json").read_text())
    assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped_by_reason"].values())

    # Same config again: every stage folder is reused, and every stage still gets its MLflow run.
    again = sft_pipeline(config=config_to_dict(cfg))
    assert again["model"] == result["model"] and again["metrics"] == result["metrics"]
    rerun_children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{again['mlflow_run_id']}'")
    assert {r.data.tags["sft.stage"]: r.data.tags["cached"] for r in rerun_children} == {
        "curate": "true", "prepare": "true", "train": "true", "evaluate": "true"
    }
    replayed = client.get_metric_history(next(r for r in rerun_children if r.data.tags["sft.stage"] == "train").info.run_id, "train/loss")
    assert [m.value for m in replayed] == [m.value for m in losses]

    # Changing only the training config reuses curation and preparation.
    changed = sft_pipeline(config=config_to_dict(_cfg(tmp_path, tiny_model, "train.lr=1e-3")), until="train")
    assert changed["prepared"] == result["prepared"] and changed["model"] != result["model"]


def test_cli_rejects_bad_config_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    rc = main(["run", "--config", "conf/demo.yaml", f"work_dir={tmp_path}", "train.zero_stage=5"])
    assert rc == 2
    assert "bad value for 'train.zero_stage'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "train.lr=3e-5" in out and "mlflow ui --backend-store-uri" in out


def test_cli_preview_mask_shows_supervised_count(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    rc = main([
        "preview-mask", "--config", "conf/demo.yaml", "--row", "0", f"work_dir={tmp_path}", f"model={tiny_model}",
        "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 5}]",
    ])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Answer:" in out and "tokens supervised (green)" in out


def test_pipeline_trains_with_two_processes_under_the_launcher(prefect_server, tiny_model: Path, tmp_path: Path) -> None:
    from flows.pipeline import sft_pipeline

    cfg = _cfg(tmp_path, tiny_model, "train.nproc=2", "train.grad_accum=1", "experiment=flow-test-2proc",
               "train.log_model=true", "train.eval_every=1")
    result = sft_pipeline(config=config_to_dict(cfg), until="train")
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri())
    runs = client.search_runs(
        [client.get_experiment_by_name("flow-test-2proc").experiment_id], f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'"
    )
    train_run = next(r for r in runs if r.data.tags["sft.stage"] == "train")
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "train/loss")] == [1, 2]
    # Held-out loss during training, across both ranks.
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "eval/loss")] == [1, 2]
    ds = json.loads((Path(result["model"]).parent / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 2
    assert (Path(result["model"]) / "model.safetensors").is_file()
    # Logged as an artifact; system metrics sampled during training.
    assert {a.path for a in client.list_artifacts(train_run.info.run_id, "model")} >= {"model/model.safetensors", "model/config.json"}
    assert any(k.startswith("system/") for k in client.get_run(train_run.info.run_id).data.metrics)


def test_train_dry_run_prints_exact_launcher_command(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    base = [f"work_dir={tmp_path}", f"model={tiny_model}", "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 20}]",
            "prepare.max_seq_len=128"]
    assert main(["train", "--dry-run", "-c", "conf/demo.yaml", *base, "train.nproc=2"]) == 0
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1" in out and "-m sft_engine.launch" in out
    hostfile = tmp_path / "hosts.ds"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    assert main(["train", "--dry-run", "-c", "conf/demo.yaml", *base, f"train.hostfile={hostfile}"]) == 0
    out = capsys.readouterr().out
    assert f"deepspeed --hostfile {hostfile} --master_port" in out and "--module sft_engine.launch" in out
    assert not (tmp_path / "train").exists()


def test_gate_decides_registration_and_the_flow_state_says_why(prefect_server, tiny_model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.client.orchestration import get_client

    from flows.cli import main
    from flows.pipeline import sft_pipeline
    from sft_engine.evaluation.report import GateFailed

    cfg = _cfg(tmp_path, tiny_model, "experiment=gate-test", "evaluate.register_model=tiny-sft", ARITH_SUITE,
               "evaluate.gate.heldout_loss_must_drop=false", "evaluate.gate.min_scores={arith.numeric: 0.0}")
    result = sft_pipeline(config=config_to_dict(cfg))
    assert result["gate"] == {"passed": True, "reasons": []} and result["registered_version"] == "1"
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri())
    (version,) = client.search_model_versions("name='tiny-sft'")
    parent = client.get_run(result["mlflow_run_id"])
    assert version.run_id == parent.info.run_id
    assert version.tags["curated_digest"] == json.loads((Path(result["curated"]) / "stats.json").read_text())["digest"]
    assert version.tags["packed_digest"] == json.loads((Path(result["prepared"]) / "manifest.json").read_text())["digest"]
    assert version.tags["prefect_flow_run_id"] == parent.data.tags["prefect.flow_run_id"] and version.tags["git_commit"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "model")} >= {"model/model.safetensors"}
    # The team's own suite is scored, compared and logged like the built-ins.
    assert {"eval/arith.numeric/base", "eval/arith.numeric/tuned", "eval/arith.numeric/delta"} <= set(parent.data.metrics)
    assert next(r for r in result["table"] if r["metric"] == "arith.numeric")["higher_is_better"] is True

    # An unreachable minimum on the team's own metric: the flow fails with the reason, nothing new is registered,
    # scores are reused.
    strict = _cfg(tmp_path, tiny_model, "experiment=gate-test", "evaluate.register_model=tiny-sft", ARITH_SUITE,
                  "evaluate.gate.heldout_loss_must_drop=false", "evaluate.gate.min_scores={arith.numeric: 1.01}")
    state = sft_pipeline(config=config_to_dict(strict), return_state=True)
    assert state.is_failed() and "arith.numeric = " in state.message and "below the minimum 1.01" in state.message
    with pytest.raises(GateFailed):
        state.result()
    assert len(client.search_model_versions("name='tiny-sft'")) == 1
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(state.state_details.flow_run_id).state.is_failed()
    failed_parent = client.search_runs(
        [parent.info.experiment_id], "tags.`sft.gate` = 'failed' and tags.`sft.stage` = 'sft_pipeline'"
    )
    assert len(failed_parent) == 1 and "below the minimum 1.01" in failed_parent[0].data.tags["sft.gate_reasons"]
    assert failed_parent[0].data.tags["sft.gate_reasons"].startswith("arith.numeric = ")

    # Standalone: any local model folder against the config's base model; finished stages are reused.
    argv = ["evaluate", "--model", result["model"], "-c", "conf/demo.yaml", *_cfg_overrides(tmp_path, tiny_model),
            "experiment=gate-test", "evaluate.gate.heldout_loss_must_drop=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| verifiable.exact_match | ↑ |" in out and "| word_problems.numeric | ↑ |" in out and "gate: passed" in out
    assert main([*argv, "evaluate.gate.min_scores={verifiable.exact_match: 1.01}"]) == 3
    assert "evaluation gate failed: verifiable.exact_match" in capsys.readouterr().err

    # gc on this work_dir: a later run with another max_seq_len left a prepare folder nothing else refers to, and a
    # killed run a temporary folder. The registered version keeps its run's folders (and what they were made from).
    work = tmp_path / "work"
    other = sft_pipeline(config=config_to_dict(_cfg(tmp_path, tiny_model, "experiment=gate-test", ARITH_SUITE, "prepare.max_seq_len=128")),
                         until="prepare")
    other_prepared = Path(other["prepared"])
    stale = work / "prepare" / ".tmp-0123456789abcdef-deadbeef"
    stale.mkdir()
    config_file = tmp_path / "registered.yaml"
    config_file.write_text(json.dumps(config_to_dict(cfg)))  # the registered run's config (JSON is YAML)
    gc_argv = ["gc", "-c", str(config_file)]

    def gc_lines(*extra: str) -> dict[str, str]:
        assert main([*gc_argv, *extra]) == 0
        rows = [line.split(None, 6) for line in capsys.readouterr().out.splitlines() if " MiB " in line and " d  " in line]
        return {r[4]: r[6] for r in rows}

    lines = gc_lines("--keep-last", "0")
    assert lines[f"prepare/{other_prepared.name}"] == "remove" and lines[f"prepare/{stale.name}"] == "remove"
    trained = Path(result["model"]).parent
    # The standalone evaluation above registered the same model as sft-demo (conf/demo.yaml's register_model).
    assert set(lines[f"train/{trained.name}"].removeprefix("keep: ").split("; ")) == {
        "registered tiny-sft v1", "registered sft-demo v1", "the config"}
    assert {rel: why for rel, why in lines.items() if rel.split("/")[1] not in (other_prepared.name, stale.name) and not why.startswith("keep: ")} == {}
    assert any(rel.startswith("evaluate_models/") for rel in lines)  # scores kept through the evaluation's inputs.json
    assert gc_lines("--keep-last", "1")[f"prepare/{other_prepared.name}"].startswith("keep: run ")
    from sft_engine.io import key_lock

    with key_lock(other_prepared):  # as if a stage were building it right now
        assert gc_lines("--keep-last", "0")[f"prepare/{other_prepared.name}"] == "keep: locked by a running stage"
    assert other_prepared.is_dir() and stale.is_dir()  # a dry run removes nothing

    gc_lines("--keep-last", "0", "--apply")
    assert not other_prepared.exists() and not stale.exists()
    assert (trained / "model" / "model.safetensors").is_file() and is_complete(Path(result["prepared"]))


BROKEN = CHATML.replace("message['content'] + '<|im_end|>'", "message['content'] + ' 7<|im_end|>'").replace(
    "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n 7'")


def test_cli_check_template_passes_the_tiny_model_and_fails_a_broken_template(tiny_model: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    rc = main(["check-template", "--model", str(tiny_model), "--json", str(tmp_path / "check.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "single_turn" in out and "tool_call" in out and "verdict" in out and "ok" in out
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] and report["counts"] == {"pass": 7, "rejected": 1}
    # Plain ChatML has no tool-call syntax: such rows are dropped, not trained as empty replies.
    (tool,) = [r for r in report["results"] if r["result"] == "rejected"]
    assert tool["shape"] == "tool_call" and tool["why"][0].startswith("mask_template_drops_tool_calls")
    # A generation prompt that writes " 7" where the turn writes the reply: no turn has an inference form.
    (tmp_path / "broken.jinja").write_text(BROKEN)
    rc = main(["check-template", "--model", str(tiny_model), "--template", str(tmp_path / "broken.jinja")])
    out = capsys.readouterr().out
    assert rc == 4 and "FAILED" in out and "mask_prompt_not_prefix" in out


def test_preparation_stops_on_a_template_that_fails_its_self_check_unless_allowed(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    from sft_engine import stages
    from sft_engine.chat import TemplateError
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    (broken / "chat_template.jinja").write_text(BROKEN)
    overrides = [f"work_dir={tmp_path / 'w'}", f"model={broken}", "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 20}]"]
    cfg = load_config(None, overrides)
    curated = curation.run_curate(cfg).path
    with pytest.raises(TemplateError, match="fails the mask self-check .*check-template --model .*allow_unverified_template=true"):
        stages.run_prepare(cfg, curated)
    assert not (tmp_path / "w" / "prepare").exists() or not any((tmp_path / "w" / "prepare").iterdir())
    allowed = load_config(None, [*overrides, "prepare.allow_unverified_template=true"])
    out = stages.run_prepare(allowed, curated).path
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["template_check"]["ok"] is False
    assert manifest["splits"]["train"]["dropped_by_reason"] == {"mask_prompt_not_prefix": manifest["splits"]["train"]["rows_in"]}
