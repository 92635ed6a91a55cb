"""ftkit.generation.graph_generate (the CUDA-graph greedy decoder behind generation.batch_runner) gives
model.generate's tokens.

On the CPU the same step code runs without the graph (and without torch.compile); on a GPU the `gpu` test
runs it captured. Tiny random Llama in float32, left-padded rows of different lengths, EOS ends rows at
different steps, min_new_tokens holds EOS back.
"""

from __future__ import annotations

import pytest
import torch

from ftkit import generation
from ftkit.config import InferenceCfg, load_config
from ftkit.errors import UserError


def tiny_llama(device="cpu"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device).eval()


def batch(lens, pad=0, device="cpu"):
    w = max(lens)
    ids = torch.full((len(lens), w), pad)
    mask = torch.zeros((len(lens), w), dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for r, n in enumerate(lens):
        ids[r, w - n :] = torch.randint(3, 300, (n,), generator=g)
        mask[r, w - n :] = 1
    return ids.to(device), mask.to(device)


def reference(model, ids, mask, n, eos, min_new=0):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=eos or None,
            pad_token_id=0,
            min_new_tokens=min_new,
        )


def check_same_as_generate(device, compile_):
    model = tiny_llama(device)
    ids, mask = batch([7, 12, 4], device=device)
    w, n = ids.shape[1], 20
    free = reference(model, ids, mask, n, [])
    cases = [
        ([], 0),  # no EOS: full length
        ([int(free[0, w + 3]), 2], 0),  # one row ends early
        ([int(free[0, w + 3]), 2], 10),  # ... but not before 10 tokens
        ([int(free[0, w + 3]), int(free[1, w + 5]), int(free[2, w + 2])], 0),
    ]  # all end: output is cut
    for eos, min_new in cases:
        want = reference(model, ids, mask, n, eos, min_new)
        for _ in range(2):  # the decoder is reused across calls
            got = generation.graph_generate(
                model,
                ids,
                mask,
                max_new_tokens=n,
                eos_token_ids=eos,
                pad_token_id=0,
                max_cache_len=64,
                min_new_tokens=min_new,
                compile=compile_,
            )
            assert got.shape == want.shape and torch.equal(got, want), (eos, min_new)
    assert want.shape[1] < w + n  # the last case did stop early
    return model


def test_fastgen_matches_generate_cpu():
    check_same_as_generate("cpu", compile_=False)


@pytest.mark.gpu
def test_fastgen_matches_generate_cuda_graph():
    model = check_same_as_generate("cuda", compile_=True)
    decoders = model._ftkit_graph_decoders.values()
    assert decoders and all(d.graph is not None for d in decoders), [d.capture_error for d in decoders]


def test_batch_runner_fast_path_same_answers(monkeypatch):
    """generation.batch_runner: the fastgen path and the model.generate path give the same ids."""
    from ftkit import generation

    model = tiny_llama()
    ids, mask = batch([5, 9])
    icfg = InferenceCfg(max_new_tokens=12, cache_implementation="static", compile=False, device="cpu")
    kw = dict(
        max_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.0,
        pad_token_id=0,
        eos_token_id=[2],
        temperature=None,
        top_p=None,
        top_k=None,
        cache_implementation="static",
        disable_compile=True,
        max_cache_len=generation.static_cache_len(9, 12, 512),
    )
    slow = generation.batch_runner(model, icfg, kw, fast=False)
    monkeypatch.setattr(generation, "FAST_DEVICES", ("cuda", "cpu"))
    fast = generation.batch_runner(model, icfg, kw)
    assert fast.__name__ == "run_fast" and slow.__name__ == "run"
    assert torch.equal(fast(ids, mask), slow(ids, mask))


def test_decode_settings_and_config():
    from ftkit import generation

    assert generation.decode_settings(InferenceCfg(device="cpu")) == ("dynamic", False)
    assert generation.decode_settings(InferenceCfg(device="cpu", compile=True)) == ("static", True)
    assert generation.decode_settings(InferenceCfg(device="cpu", cache_implementation="static")) == ("static", False)
    assert generation.static_cache_len(128, 128, 8192) == 256 and generation.static_cache_len(300, 256, 512) == 512
    with pytest.raises(UserError, match="needs a static KV cache"):
        load_config(None, ["inference.compile=true", "inference.cache_implementation=dynamic"])
