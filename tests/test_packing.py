"""Padding-free packing without cross-row contamination: a packed batch gives each row the loss it gets alone.

A tiny random Llama on CPU (a few seconds). On the GPU the same attention function runs torch's varlen flash
kernel instead of the row-by-row SDPA used here; benchmarks/train_throughput.py repeats this check there on
the 8B model.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ftkit import attention  # noqa: E402
from ftkit.plan import lr_scale  # noqa: E402

LENGTHS = (7, 12, 5, 9)


def tiny_model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A large init makes attention matter: mixing rows would move the loss visibly.
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.4,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def rows():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 101, (n,), generator=g) for n in LENGTHS]


def per_row_alone(model):
    out = []
    for r in rows():
        with torch.no_grad():
            out.append(model(input_ids=r[None], labels=r[None]).loss.item())
    return out


def per_row_packed(model, batch: dict):
    """Mean next-token loss of each original row inside the packed row."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
    labels = batch["labels"][0]
    tok_loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
    out, start = [], 0
    for n in LENGTHS:
        seg = tok_loss[start : start + n - 1]  # the targets of row i are its own tokens 1..n-1
        out.append(seg.mean().item())
        start += n
    return out


def collate():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    c = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return c([{"input_ids": r.tolist()} for r in rows()])


def test_packed_rows_match_rows_alone():
    attention.register()
    model = tiny_model(attention.VARLEN_ATTN)
    alone = per_row_alone(model)
    batch = collate()
    assert "cu_seq_lens_q" in batch and batch["input_ids"].shape == (1, sum(LENGTHS))
    packed = per_row_packed(model, batch)
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)
    # Without the collator's boundaries the attention derives them from the restarting position_ids.
    derived = per_row_packed(model, {k: batch[k] for k in ("input_ids", "position_ids", "labels")})
    assert derived == pytest.approx(alone, rel=1e-5, abs=1e-5)


def test_check_detects_contamination():
    """The check above can fail: rows attending across boundaries (an all-ones mask over the packed row) give
    other losses."""
    model = tiny_model("eager")
    alone = per_row_alone(model)
    batch = collate()
    batch = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "labels": batch["labels"],
        "attention_mask": torch.ones_like(batch["input_ids"]),
    }
    mixed = per_row_packed(model, batch)
    assert mixed[0] == pytest.approx(alone[0], rel=1e-5)  # the first row sees nothing before it
    assert max(abs(a - b) for a, b in zip(mixed[1:], alone[1:])) > 1e-3


def test_padded_batches_unchanged():
    """Batches with padding take SDPA's ordinary masked path: same logits as "sdpa"."""
    attention.register()
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref, var = tiny_model("sdpa"), tiny_model(attention.VARLEN_ATTN)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = var(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :6], b[1, :6], atol=1e-5)


def test_lr_scale():
    assert lr_scale(64, 16, "sqrt") == pytest.approx(2.0)
    assert lr_scale(64, 16, "linear") == pytest.approx(4.0)
    assert lr_scale(64, 16, "none") == 1.0
