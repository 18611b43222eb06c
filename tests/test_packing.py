from __future__ import annotations

import numpy as np
import pytest
import torch

from sft_engine.constants import IGNORE_INDEX
from sft_engine.data import collate
from sft_engine.loss import supervised_count, token_loss_sum
from sft_engine.packing import best_fit_decreasing, cu_seqlens, pack_rows, plan_packing, position_ids_from_lens


def _row(rows: dict, i: int) -> dict:
    return {k: (v[i] if k in ("num_pad", "weights") else v[i].astype(np.int64)) for k, v in rows.items()}


def _first_row(rows: dict) -> dict:
    return _row(rows, 0)


def test_best_fit_decreasing_exact_bins() -> None:
    # Sorted: 7(0) 6(3) 5(1) 4(5) 3(2) 2(4) 1(6); capacity 10.
    # 7 -> new bin A(rest 3); 6 -> new B(rest 4); 5 -> new C(rest 5); 4 -> B (fullest that fits, rest 0);
    # 3 -> A (rest 0); 2 -> C (rest 3); 1 -> C (rest 2).
    assert best_fit_decreasing([7, 5, 3, 6, 2, 4, 1], 10) == [[0, 2], [3, 5], [1, 4, 6]]


def test_best_fit_decreasing_ties_are_deterministic_and_complete() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=5000)
    bins = best_fit_decreasing(lengths, 512)
    assert bins == best_fit_decreasing(lengths, 512)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(5000))
    assert all(sum(int(lengths[i]) for i in b) <= 512 for b in bins)
    fill = lengths.sum() / (len(bins) * 512)
    assert fill > 0.99


def test_plan_drops_or_truncates_overlong_and_counts() -> None:
    drop = plan_packing([5, 12, 3], 8, "drop")
    assert drop.dropped == [1] and drop.truncated == [] and sorted(i for b in drop.bins for i in b) == [0, 2]
    trunc = plan_packing([5, 12, 3], 8, "truncate")
    assert trunc.truncated == [1] and trunc.dropped == [] and sorted(i for b in trunc.bins for i in b) == [0, 1, 2]
    with pytest.raises(ValueError, match="every length must be in 1..8"):
        best_fit_decreasing([9], 8)


def test_packed_layout_positions_and_boundary_labels() -> None:
    ids = [np.array([10, 11, 12, 13]), np.array([20, 21, 22])]
    labels = [np.array([IGNORE_INDEX, 11, 12, 13]), np.array([20, 21, 22])]  # sample b "trains" its first token
    rows = pack_rows(ids, labels, [[0, 1]], max_seq_len=9, pad_id=0)
    assert rows["input_ids"][0].tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0]
    # The first label of every segment is ignored: nothing predicts across a boundary.
    assert rows["labels"][0].tolist() == [-100, 11, 12, 13, -100, 21, 22, -100, -100]
    assert rows["seq_lens"][0].tolist() == [4, 3, 2]
    assert rows["num_pad"] == [2]
    assert position_ids_from_lens(rows["seq_lens"][0]).tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert cu_seqlens(rows["seq_lens"][0]).tolist() == [0, 4, 7, 9]


def test_packed_batch_has_same_loss_and_gradients_as_unpacked(tiny_model) -> None:
    """Proof that samples in one packed row do not attend to each other (SDPA on CPU, fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    samples = []
    for n in (7, 12, 5):
        ids = torch.randint(3, vocab, (n,), generator=g).numpy()
        lab = ids.copy()
        lab[: n // 2] = IGNORE_INDEX
        samples.append((ids, lab))

    # Unpacked: one forward per sample, token losses summed.
    model.zero_grad()
    total_unpacked = torch.zeros(())
    for ids, lab in samples:
        out = model(input_ids=torch.tensor(ids)[None], use_cache=False)
        total_unpacked = total_unpacked + token_loss_sum(out.logits, torch.tensor(lab)[None])
    n_tokens = sum(supervised_count(torch.tensor(lab)[None]) for _, lab in samples)
    (total_unpacked / n_tokens).backward()
    grads_unpacked = {k: p.grad.clone() for k, p in model.named_parameters()}

    # Packed: all three in one row of 32 with padding, position ids restarting per sample.
    rows = pack_rows([s[0] for s in samples], [s[1] for s in samples], [[0, 1, 2]], max_seq_len=32, pad_id=0)
    batch = collate([_first_row(rows)])
    assert supervised_count(batch["labels"]) == n_tokens
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    total_packed = token_loss_sum(out.logits, batch["labels"])
    (total_packed / n_tokens).backward()

    assert torch.allclose(total_packed, total_unpacked, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads_unpacked[name], atol=1e-5, rtol=1e-5), name


def test_packed_weighted_samples_have_the_same_loss_and_gradients_as_unpacked(tiny_model) -> None:
    """Message weights survive packing: a weighted sample beside unweighted ones (weights None: all 1) gives the
    same weighted token-loss sum and gradients packed as one forward per sample."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    samples, weights = [], []
    for n, w in ((9, 2.0), (6, None), (11, 0.5)):
        ids = torch.randint(3, vocab, (n,), generator=g).numpy()
        lab = ids.copy()
        lab[:3] = IGNORE_INDEX
        samples.append((ids, lab))
        weights.append(None if w is None else np.where(lab != IGNORE_INDEX, w, 0.0).astype(np.float32))

    model.zero_grad()
    total_unpacked = torch.zeros(())
    for (ids, lab), w in zip(samples, weights, strict=True):
        out = model(input_ids=torch.tensor(ids)[None], use_cache=False)
        total_unpacked = total_unpacked + token_loss_sum(out.logits, torch.tensor(lab)[None], None if w is None else torch.tensor(w)[None])
    n_tokens = sum(supervised_count(torch.tensor(lab)[None]) for _, lab in samples)
    (total_unpacked / n_tokens).backward()
    grads_unpacked = {k: p.grad.clone() for k, p in model.named_parameters()}

    rows = pack_rows([s[0] for s in samples], [s[1] for s in samples], [[0, 1, 2]], max_seq_len=32, pad_id=0, weights=weights)
    batch = collate([_first_row(rows)])
    assert batch["weights"][0].tolist() == [0.0] * 3 + [2.0] * 6 + [1.0] * 6 + [0.0] * 3 + [0.5] * 8 + [0.0] * 6
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    total_packed = token_loss_sum(out.logits, batch["labels"], batch["weights"])
    (total_packed / n_tokens).backward()
    assert torch.allclose(total_packed, total_unpacked, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads_unpacked[name], atol=1e-5, rtol=1e-5), name
    # Unweighted rows store no weights at all.
    assert pack_rows([s[0] for s in samples], [s[1] for s in samples], [[1]], 32, 0, weights)["weights"] == [None]


def test_packing_without_position_ids_would_leak(tiny_model) -> None:
    """The control: dropping the restarting position ids lets samples see each other and changes the loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    ids = [np.arange(3, 13), np.arange(20, 28)]
    labels = [x.copy() for x in ids]
    rows = pack_rows(ids, labels, [[0, 1]], max_seq_len=18, pad_id=0)
    batch = collate([_first_row(rows)])
    with torch.no_grad():
        isolated = token_loss_sum(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits, batch["labels"])
        leaking = token_loss_sum(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])
    assert not torch.allclose(isolated, leaking, atol=1e-4)


def test_per_sample_loss_on_packed_rows_equals_mean_of_unpacked_sample_means(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    from sft_engine.loss import sample_count, sample_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (6, 11, 4):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=g).numpy()
        lab = ids.copy()
        lab[:2] = IGNORE_INDEX
        samples.append((ids, lab))
    with torch.no_grad():
        means = []
        for ids, lab in samples:
            logits = model(input_ids=torch.tensor(ids)[None], use_cache=False).logits
            means.append(token_loss_sum(logits, torch.tensor(lab)[None]) / supervised_count(torch.tensor(lab)[None]))
        rows = pack_rows([s[0] for s in samples], [s[1] for s in samples], [[0, 1, 2]], max_seq_len=24, pad_id=0)
        batch = collate([_first_row(rows)])
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        total, n_samples = sample_loss_sum(logits, batch["labels"], batch["position_ids"])
    assert n_samples == 3 == sample_count(batch["labels"], batch["position_ids"])
    assert torch.allclose(total / n_samples, torch.stack(means).mean(), atol=1e-5)


def test_flattened_micro_batch_gives_the_same_loss(tiny_model) -> None:
    """The FlashAttention path trains on micro-batches flattened to one row; that must not change the loss."""
    from transformers import AutoModelForCausalLM

    from sft_engine.train import flatten_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(2)
    samples = [torch.randint(3, model.config.vocab_size, (n,), generator=g).numpy() for n in (9, 5, 12, 6)]
    rows = pack_rows(samples, [s.copy() for s in samples], [[0, 1], [2, 3]], max_seq_len=20, pad_id=0)
    batch = collate([_row(rows, i) for i in range(2)])
    flat = flatten_batch(batch)
    assert flat["input_ids"].shape == (1, 40) and flat["position_ids"][0, 20].item() == 0
    with torch.no_grad():
        per_row = token_loss_sum(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits, batch["labels"])
        one_row = token_loss_sum(model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits, flat["labels"])
    assert torch.allclose(per_row, one_row, atol=1e-4)
    assert supervised_count(flat["labels"]) == supervised_count(batch["labels"])
