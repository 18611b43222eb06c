"""The whole pipeline as Prefect flows on a real temporary server, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sft_engine.config import config_to_dict, load_config

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, tiny_model: Path, *extra: str):
    return load_config(None, [
        f"work_dir={tmp_path / 'work'}", f"model={tiny_model}", "experiment=flow-test",
        "curate.sources=[{name: tasks, builtin: verifiable_tasks, limit: 160}, {name: chat, builtin: chitchat, limit: 40}]",
        "curate.heldout_fraction=0.1", "prepare.max_seq_len=256",
        "train.max_steps=2", "train.grad_accum=2", "train.lr=3e-3", "train.warmup_steps=0",
        "evaluate.generate_samples=2", "evaluate.max_new_tokens=4", *extra,
    ])


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
    assert {"base.loss", "tuned.loss", "delta_loss"} <= set(ev)
    assert ev["delta_loss"] == pytest.approx(ev["tuned.loss"] - ev["base.loss"])

    artifacts = {a.path for a in client.list_artifacts(by_stage["curate"].info.run_id)}
    assert {"stats.json", "drop_reasons.png", "config.json", "lengths_before_after.png", "source_share.png"} <= artifacts
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
               "train.register_model=tiny-sft", "train.eval_every=1")
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
    # Logged as an artifact and registered; system metrics sampled during training.
    assert {a.path for a in client.list_artifacts(train_run.info.run_id, "model")} >= {"model/model.safetensors", "model/config.json"}
    versions = client.search_model_versions("name='tiny-sft'")
    assert [v.run_id for v in versions] == [train_run.info.run_id]
    assert any(k.startswith("system/") for k in client.get_run(train_run.info.run_id).data.metrics)


def test_train_dry_run_prints_exact_launcher_command(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    base = [f"work_dir={tmp_path}", f"model={tiny_model}", "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 20}]",
            "prepare.max_seq_len=128"]
    assert main(["train", "--dry-run", "-c", "conf/demo.yaml", *base, "train.nproc=2"]) == 0
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1" in out and "-m sft_engine.launch" in out
    assert main(["train", "--dry-run", "-c", "conf/demo.yaml", *base, "train.hostfile=/etc/hosts.ds"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed --hostfile /etc/hosts.ds --master_port" in out and "--module sft_engine.launch" in out
    assert not (tmp_path / "train").exists()
