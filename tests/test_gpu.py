"""The GPU paths (CUDA, NCCL, bf16), run where a GPU is present: `benchmarks/gpu_session.sh` runs them on the lent
GPU machine. CI has no GPU and skips them; their CPU counterparts are tests/test_packing.py, tests/test_attention.py
and tests/test_train.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sft_engine.attention import VARLEN, register
from sft_engine.config import TrainConfig
from sft_engine.constants import IGNORE_INDEX
from sft_engine.data import collate
from sft_engine.loss import supervised_count, token_loss_sum
from sft_engine.packing import pack_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


@pytest.fixture(scope="module")
def packed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's packed rows without decontamination: the GPU image lacks the evaluation sets' data packages."""
    from sft_engine import stages
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    cfg = load_config(None, [
        f"work_dir={tmp_path_factory.mktemp('gpu_packed')}", f"model={tiny_model}",
        "curate.sources=[{name: tasks, builtin: verifiable_tasks, limit: 200}]", "prepare.max_seq_len=128",
        "curate.heldout_fraction=0.0", "curate.decontaminate.include_evaluation_sets=false",
    ])
    return stages.run_prepare(cfg, curation.run_curate(cfg).path).path / "train.arrow"


def _packed(samples: list[tuple], max_seq_len: int) -> dict[str, torch.Tensor]:
    rows = pack_rows([s[0] for s in samples], [s[1] for s in samples], [list(range(len(samples)))], max_seq_len, pad_id=0)
    return collate([{k: v[0] if k in ("num_pad", "weights") else v[0].astype(np.int64) for k, v in rows.items()}])


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_tokens: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False)
    total = token_loss_sum(out.logits, batch["labels"].cuda())
    (total / n_tokens).backward()
    return total.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("attn", [VARLEN, "sdpa"])
def test_packed_row_has_the_loss_and_gradients_of_its_samples_alone_on_gpu(tiny_model: Path, attn: str) -> None:
    """Three samples packed in one row of 32 against each sample alone, on the GPU in fp32: our varlen attention
    (the trainer's default without flash-attn) and transformers' SDPA with the packed mask."""
    from sft_engine.model import load_model

    register()
    model = load_model(tiny_model).cuda()
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (7, 12, 5):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=g).numpy()
        lab = ids.copy()
        lab[: n // 2] = IGNORE_INDEX
        samples.append((ids, lab))
    n_tokens = sum(supervised_count(torch.tensor(lab)[None]) for _, lab in samples)

    alone_total, alone_grads = torch.zeros((), device="cuda"), None
    for ids, lab in samples:
        total, grads = _loss_and_grads(model, _packed([(ids, lab)], len(ids)), n_tokens)
        alone_total += total
        alone_grads = grads if alone_grads is None else {k: alone_grads[k] + grads[k] for k in grads}
    packed_total, packed_grads = _loss_and_grads(model, _packed(samples, 32), n_tokens)

    assert abs(float(packed_total - alone_total)) < 1e-4 * max(1.0, float(alone_total.abs()))
    worst = {k: float((packed_grads[k] - alone_grads[k]).abs().max()) for k in packed_grads}
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_zero3_two_steps_on_gpu_follow_stage_0_and_export_full_weights(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    """Two fp32 steps with ZeRO-3 (parameters partitioned, NCCL) and with stage 0: the same losses and first grad norm;
    the exported ZeRO-3 model holds every full-size weight."""
    from transformers import AutoModelForCausalLM

    from sft_engine.train import train

    runs = {
        stage: train(tiny_model, packed, tmp_path / f"s{stage}", TrainConfig(zero_stage=stage, max_steps=2, grad_accum=2, lr=1e-3,
                     precision="fp32"), seed=0, show_progress=False)
        for stage in (0, 3)
    }
    assert runs[3].steps == 2
    assert runs[3].losses == pytest.approx(runs[0].losses, abs=1e-4)
    assert runs[3].history[0]["train/grad_norm"] == pytest.approx(runs[0].history[0]["train/grad_norm"], rel=1e-3)
    shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_pretrained(tiny_model).state_dict().items()}
    exported = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_pretrained(tmp_path / "s3").state_dict().items()}
    assert exported == shapes


def test_bf16_zero3_steps_on_gpu_lower_the_loss_and_report_mfu(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    """The shipped GPU precision (bf16 weights, fp32 master) under ZeRO-3: the loss falls over three steps, and every
    step reports MFU against the GPU's peak (train.PEAK_BF16_FLOPS names it)."""
    from sft_engine.train import train

    cfg = TrainConfig(zero_stage=3, max_steps=3, grad_accum=2, micro_batch_size=2, lr=5e-3, warmup_steps=0, precision="bf16")
    result = train(tiny_model, packed, tmp_path / "m", cfg, seed=0, show_progress=False)
    assert result.losses[-1] < result.losses[0]
    assert all(0 < h["train/mfu"] < 1 for h in result.history)


def _bf16_errors(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per attention kernel in bf16, the relative error of the logits and of the whole gradient against the same
    model in fp32 with the per-sample SDPA calls (the CPU path, exact to 1e-5 by tests/test_attention.py)."""
    def run(dtype: torch.dtype, attn: str) -> tuple[torch.Tensor, torch.Tensor]:
        m = model.to(dtype)
        m.set_attn_implementation(attn)
        m.zero_grad()
        logits = m(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False).logits
        logits.float().pow(2).mean().backward()
        return logits.detach().float(), torch.cat([p.grad.float().flatten() for p in m.parameters()])

    register()
    ref_logits, ref_grad = run(torch.float32, VARLEN)  # fp32: the per-sample calls
    errors = {}
    for attn in (VARLEN, "sdpa"):
        logits, grad = run(torch.bfloat16, attn)
        errors[attn] = (float((logits - ref_logits).norm() / ref_logits.norm()), float((grad - ref_grad).norm() / ref_grad.norm()))
    return errors


@pytest.mark.parametrize("kind", ["tiny_gqa", "mistral_window"])
def test_bf16_varlen_runs_flash_varlen_as_accurately_as_sdpa(tiny_model: Path, packed: Path, kind: str) -> None:
    """In bf16 on the GPU, sdpa_varlen takes FlashAttention's varlen kernel (one call per layer): its logits and
    gradient are as close to the fp32 result as transformers' SDPA with the packed mask in bf16 (the tiny model has
    grouped-query attention; Mistral's window of 5 tokens is banded inside samples of 9 and 12)."""
    from sft_engine.attention import flash_varlen_usable

    if kind == "tiny_gqa":
        from sft_engine.data import PackedDataset, collate
        from sft_engine.model import load_model

        model = load_model(tiny_model).cuda()
        batch = collate([PackedDataset(packed)[i] for i in range(3)])
    else:
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                                 max_position_embeddings=64)).cuda()
        lens = [3, 9, 12]
        batch = {"input_ids": torch.randint(0, 64, (1, sum(lens))),
                 "position_ids": torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert flash_varlen_usable(torch.zeros(1, 1, 1, head_dim, dtype=torch.bfloat16, device="cuda"))
    errors = _bf16_errors(model, batch)
    (flash_logits, flash_grad), (sdpa_logits, sdpa_grad) = errors[VARLEN], errors["sdpa"]
    assert flash_logits < 1e-2 and flash_grad < 5e-2, errors
    assert flash_logits <= 2 * sdpa_logits + 1e-3 and flash_grad <= 2 * sdpa_grad + 1e-3, errors
