from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sft_engine.config import TrainConfig
from sft_engine.train import deepspeed_config, lr_factor, total_steps, train

pytestmark = pytest.mark.slow


def test_deepspeed_config_is_derived_from_train_config() -> None:
    cfg = TrainConfig(zero_stage=3, micro_batch_size=2, grad_accum=3, grad_clip=0.5, precision="bf16")
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}


def test_schedule_warmup_then_cosine_to_floor() -> None:
    assert [round(lr_factor(s, 2, 10, 0.1), 4) for s in (0, 1, 2, 10)] == [0.3333, 0.6667, 1.0, 0.1]
    assert total_steps(TrainConfig(grad_accum=2, micro_batch_size=2, epochs=1.0), n_rows=9, world_size=1) == 3
    assert total_steps(TrainConfig(max_steps=5), n_rows=9, world_size=1) == 5


def test_two_step_deepspeed_run_decreases_loss_and_saves_loadable_model(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = TrainConfig(zero_stage=2, max_steps=2, grad_accum=2, micro_batch_size=2, lr=5e-3, warmup_steps=0)
    result = train(tiny_model, packed, tmp_path / "model", cfg, seed=0, show_progress=False)
    assert result.steps == 2
    assert result.losses[1] < result.losses[0]
    assert result.supervised_tokens > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tok.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "compute the result."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5 or int(gen[0, -1]) == tok.eos_token_id
    before = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(before.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_grad_accum_step_equals_one_big_batch_step(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    """Loss per token over the whole window: 4 micro-batches of 1 row == 1 micro-batch of 4 rows.

    Compared on the loss trajectory, not on weights: AdamW's first update is about lr * sign(g), so
    parameters whose gradient is ~0 may flip under a different summation order without changing
    anything that matters; step 2's loss shows the updates agree where they count.
    """
    common = {"zero_stage": 1, "max_steps": 2, "lr": 1e-3, "warmup_steps": 0, "grad_clip": None}
    acc = train(tiny_model, packed, tmp_path / "acc", TrainConfig(micro_batch_size=1, grad_accum=4, **common), seed=1, show_progress=False)
    big = train(tiny_model, packed, tmp_path / "big", TrainConfig(micro_batch_size=4, grad_accum=1, **common), seed=1, show_progress=False)
    assert acc.losses == pytest.approx(big.losses, abs=1e-5)
    assert acc.supervised_tokens == big.supervised_tokens


def test_grad_accum_step_equals_one_big_batch_step_with_expanded_samples_and_weights(packed_expanded, tmp_path: Path) -> None:
    """The same equality on data whose turns are expanded into samples of their own and whose replies carry weights:
    the weighted token losses of the whole window over its supervised tokens, whatever the micro-batching."""
    import json

    model, data = packed_expanded
    split = json.loads((data.parent / "manifest.json").read_text())["splits"]["train"]
    assert split["expanded_samples"] == 120 and split["weighted_samples"] > 0 and split["rows_in"] == 120
    common = {"zero_stage": 0, "max_steps": 2, "lr": 1e-3, "warmup_steps": 0, "grad_clip": None}
    acc = train(model, data, tmp_path / "acc", TrainConfig(micro_batch_size=1, grad_accum=4, **common), seed=1, show_progress=False)
    big = train(model, data, tmp_path / "big", TrainConfig(micro_batch_size=4, grad_accum=1, **common), seed=1, show_progress=False)
    assert acc.losses == pytest.approx(big.losses, abs=1e-5)
    assert acc.supervised_tokens == big.supervised_tokens


def test_zero3_exports_full_weights(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    # Threshold 0 partitions even this tiny model's small tensors, so the export must really gather.
    over = tmp_path / "ds.json"
    over.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
    cfg = TrainConfig(zero_stage=3, max_steps=1, grad_accum=1, deepspeed_overrides=str(over))
    train(tiny_model, packed, tmp_path / "z3", cfg, seed=0, show_progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "z3").state_dict()
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert all(v.numel() > 0 for v in out.values())


def test_one_process_runs_stages_1_and_2_as_stage_0_unless_told(tmp_path: Path) -> None:
    over = tmp_path / "ds.json"
    over.write_text('{"zero_optimization": {"stage": 2}}')
    stage = {
        name: deepspeed_config(cfg, world, "fp32")["zero_optimization"]["stage"]
        for name, cfg, world in [
            ("one process", TrainConfig(zero_stage=2), 1), ("stage 1", TrainConfig(zero_stage=1), 1),
            ("two processes", TrainConfig(zero_stage=2), 2), ("stage 3", TrainConfig(zero_stage=3), 1),
            ("offloaded optimizer", TrainConfig(zero_stage=2, offload_optimizer=True), 1),
            ("stage set in the override JSON", TrainConfig(zero_stage=2, deepspeed_overrides=str(over)), 1),
        ]
    }
    assert stage == {"one process": 0, "stage 1": 0, "two processes": 2, "stage 3": 3, "offloaded optimizer": 2,
                     "stage set in the override JSON": 2}


def test_grad_norm_is_reported_at_every_zero_stage(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    """Stage 0, and stage 2 kept in one process by the override JSON: the same first step's grad norm, and stage 0
    (what one process runs for zero_stage 2) gives the same two losses as stage 2."""
    over = tmp_path / "ds.json"
    over.write_text('{"zero_optimization": {"stage": 2}}')
    runs = {
        stage: train(tiny_model, packed, tmp_path / f"s{stage}", TrainConfig(zero_stage=stage, max_steps=2, grad_accum=2, lr=1e-3,
                     deepspeed_overrides=str(over) if stage == 2 else None), seed=0, show_progress=False)
        for stage in (0, 2)
    }
    norms = {stage: r.history[0]["train/grad_norm"] for stage, r in runs.items()}
    assert norms[0] == pytest.approx(norms[2], rel=1e-4) and norms[0] > 0
    assert runs[0].losses == pytest.approx(runs[2].losses, abs=1e-5)


def test_periodic_heldout_eval_matches_standalone_evaluation(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sft_engine.evaluation.heldout import heldout_loss

    cfg = TrainConfig(zero_stage=3, max_steps=2, grad_accum=1, eval_every=2, eval_max_rows=None, lr=1e-3)
    result = train(tiny_model, packed, tmp_path / "m", cfg, seed=0, show_progress=False, eval_data=packed)
    evals = [h.get("eval/loss") for h in result.history]
    assert evals[0] is None and evals[1] is not None
    # The in-training value (through the ZeRO-3 engine) equals evaluating the saved model afterwards.
    standalone = heldout_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), packed, micro_batch_size=2)
    assert evals[1] == pytest.approx(standalone["loss"], abs=1e-4)


def test_chunked_lm_head_loss_and_gradients_equal_full_logits(tiny_model: Path, packed: Path) -> None:
    """On packed rows, every parameter's gradient from the checkpointed chunked head and from the fused head (chunks of
    48 tokens, not dividing a row) equals the full-logits one, for the token sum with weights plus per-sample means;
    the coefficients give the same sums as token_sum and sample_sum."""
    from sft_engine.data import PackedDataset, collate
    from sft_engine.loss import (
        chunked_token_losses,
        fused_linear_loss,
        logit_token_losses,
        loss_coefficients,
        sample_sum,
        token_sum,
    )
    from sft_engine.model import load_model

    model = load_model(tiny_model)
    batch = collate([PackedDataset(packed)[i] for i in range(3)])
    labels, pos = batch["labels"], batch["position_ids"]
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    coef = loss_coefficients(labels, pos, weights, "token") / 1000 + loss_coefficients(labels, pos, None, "sample")
    results = {}
    for path in ("full", "checkpointed", "fused"):
        model.zero_grad()
        if path == "full":
            tok = logit_token_losses(model(input_ids=batch["input_ids"], position_ids=pos).logits, labels)
            loss = token_sum(tok, weights) / 1000 + sample_sum(tok, labels, pos)[0]
            assert float((tok.detach() * coef).sum()) == pytest.approx(loss.item(), rel=1e-6)
        elif path == "checkpointed":
            hidden = model.model(input_ids=batch["input_ids"], position_ids=pos).last_hidden_state
            loss = (chunked_token_losses(hidden, model.lm_head, labels, 48) * coef).sum()
        else:
            hidden = model.model(input_ids=batch["input_ids"], position_ids=pos).last_hidden_state
            loss, fused_tok = fused_linear_loss(hidden, model.lm_head.weight, labels, coef, 48)
        loss.backward()
        results[path] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert float((fused_tok - tok.detach()).abs().max()) < 1e-5
    full, g_full = results["full"]
    for path in ("checkpointed", "fused"):
        value, grads = results[path]
        assert value == pytest.approx(full, abs=1e-5), path
        assert {n: float((g_full[n] - grads[n]).abs().max()) < 1e-5 for n in g_full} == dict.fromkeys(g_full, True), path


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_training_with_the_chunked_head_or_checkpointing_matches_full_logits(tiny_model: Path, packed: Path, tmp_path: Path,
                                                                            zero_stage: int) -> None:
    """Two steps of grad_accum 2 through DeepSpeed: the same losses and grad norms with the chunked head (the default),
    with full logits, and with gradient checkpointing. At ZeRO-3 every tensor is partitioned (threshold 0), so the
    head called outside the model's own forward must be gathered by DeepSpeed's hooks."""
    over = tmp_path / "ds.json"
    over.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
    common = {"zero_stage": zero_stage, "max_steps": 2, "grad_accum": 2, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
              "deepspeed_overrides": str(over) if zero_stage == 3 else None}
    runs = {
        name: train(tiny_model, packed, tmp_path / name, TrainConfig(**common, **extra), seed=0, show_progress=False)
        for name, extra in {"full": {"lm_head_chunk": None}, "chunked": {"lm_head_chunk": 48},
                            "checkpointed": {"lm_head_chunk": 48, "gradient_checkpointing": True}}.items()
    }
    full = runs["full"]
    for name in ("chunked", "checkpointed"):
        assert runs[name].losses == pytest.approx(full.losses, abs=1e-5), name
        norms = [h["train/grad_norm"] for h in runs[name].history]
        assert norms == pytest.approx([h["train/grad_norm"] for h in full.history], rel=1e-4), name


def test_models_that_transform_their_logits_train_on_full_logits() -> None:
    from transformers import Gemma2Config, LlamaConfig

    from sft_engine.train import _logit_transform

    assert _logit_transform(LlamaConfig()) is None
    assert _logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == "final_logit_softcapping=30.0"


def test_bf16_mixed_follows_the_fp32_loss_curve_where_bf16_weights_drift(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    """Tolerance: 0.1 % of the loss at every step (bf16 has 8 significant bits; the matmuls' rounding averages out, the
    fp32 weights keep every update). bf16 weights round updates below half their last bit away, so they drift further."""
    runs = {
        prec: train(tiny_model, packed, tmp_path / prec, TrainConfig(precision=prec, max_steps=5, grad_accum=2, micro_batch_size=2,
                                                                      lr=1e-3, warmup_steps=0), seed=0, show_progress=False).losses
        for prec in ("fp32", "bf16-mixed", "bf16")
    }
    drift = {prec: max(abs(a - b) / b for a, b in zip(runs[prec], runs["fp32"], strict=True)) for prec in ("bf16-mixed", "bf16")}
    assert 0 < drift["bf16-mixed"] < 1e-3, runs
    assert drift["bf16"] > 3 * drift["bf16-mixed"], runs
