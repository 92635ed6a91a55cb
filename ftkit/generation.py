"""Generation helpers shared by inference, evaluation and the benchmarks: greedy decoding as one CUDA graph."""
from __future__ import annotations

from typing import Sequence

import torch

from .cli import log

# -- generation: greedy decoding as one CUDA graph ----------------------------------------
# Greedy decoding with the whole decode step captured as one CUDA graph.
#
# transformers' `generate` with a static cache and torch.compile replays the model's forward as a CUDA graph, but
# around it every step still runs a few dozen small eager operations (the 4D mask, logits processors, stopping
# criteria, copies into the graph's inputs) and waits for the GPU once a step. On a host with slow kernel launches
# (the H200 machines here: 80 ms a step for the plain eager forward) that cost 7.9-8.8 ms a step at batch 1, where
# this decoder takes 5.6 ms (benchmarks/README.md, "Generation throughput").
#
# Here one step is: write the new position into a preallocated attention mask, the forward (torch.compile, the
# static KV cache of transformers), argmax, min_new_tokens/EOS bookkeeping, the token into the output buffer;
# all on fixed buffers, captured once as a CUDA graph and replayed; the host looks at the GPU only every
# `check_every` steps, to stop once every row has ended. Output equals `model.generate(do_sample=False)` with
# left-padded rows: prompt ids, then the new tokens, rows that ended filled with pad (tests/test_graph_generate.py).
#
# Greedy only, repetition_penalty 1: other settings go through `model.generate` (inference.batch_runner).


class GraphDecoder:
    """Fixed batch size and cache length; reused across calls (the CUDA graph and compiled code stay valid)."""

    def __init__(self, model, batch_size: int, max_cache_len: int, *, compile: bool = True,
                 cuda_graph: bool | None = None):
        from transformers import StaticCache
        self.model, self.b, self.L = model, batch_size, max_cache_len
        dev = model.device
        self.dev = dev
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        z = dict(device=dev, dtype=torch.long)
        self.tok = torch.zeros(batch_size, 1, **z)
        self.posid = torch.zeros(batch_size, 1, **z)
        self.pos = torch.zeros(1, **z)            # cache slot of the token being decoded
        self.n = torch.zeros(1, **z)              # index of the token being produced
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        self.mask = torch.zeros(batch_size, 1, 1, max_cache_len, dtype=torch.bool, device=dev)
        self.vocab = model.config.get_text_config().vocab_size
        self.eos_mask = torch.zeros(self.vocab, dtype=torch.bool, device=dev)
        self.eos = torch.zeros(1, **z)
        self.pad = torch.zeros((), **z)
        self.min_new = torch.zeros(1, **z)
        self.out = torch.zeros(batch_size, max_cache_len, **z)
        self.step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        self.graph = None
        self.capture_error: str | None = None
        self.use_graph = (dev.type == "cuda") if cuda_graph is None else cuda_graph
        self.ready = False

    # -- the step -------------------------------------------------------------------------------------
    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice with generate's min_new_tokens and EOS handling (finished rows get pad)."""
        logits = logits.float().masked_fill(self.eos_mask & (self.n < self.min_new), float("-inf"))
        nxt = torch.where(self.done, self.pad, logits.argmax(-1))
        self.done |= torch.isin(nxt, self.eos)
        self.out.index_copy_(1, self.n, nxt[:, None])
        self.tok.copy_(nxt[:, None])
        self.n += 1
        return nxt

    def _step(self) -> None:
        self.mask.index_fill_(3, self.pos, True)
        logits = self.model(input_ids=self.tok, attention_mask=self.mask, position_ids=self.posid,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self._select(logits)
        self.posid += 1
        self.pos += 1

    # -- setup --------------------------------------------------------------------------------------
    def _prefill(self, ids: torch.Tensor, attn: torch.Tensor) -> None:
        """The prompt through the model eagerly (as generate's prefill), then the first token."""
        self.cache.reset()
        w = ids.shape[1]
        position_ids = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1)
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=position_ids,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.mask.zero_()
        self.mask[:, 0, 0, :w] = attn.bool()
        self.posid.copy_(attn.long().sum(-1, keepdim=True))
        self.pos.fill_(w)
        self.n.zero_()
        self.done.zero_()
        self.out.zero_()
        self._select(logits)

    def _set_tokens(self, eos_token_ids: Sequence[int], pad_token_id: int, min_new_tokens: int) -> None:
        eos = sorted({int(e) for e in eos_token_ids}) or [-1]
        if self.eos.numel() != len(eos):
            raise ValueError("internal: eos count changed")  # buffers are fixed; see _decoder()
        self.eos.copy_(torch.tensor(eos))
        self.eos_mask.zero_()
        for e in eos:
            if 0 <= e < self.vocab:
                self.eos_mask[e] = True
        self.pad.fill_(int(pad_token_id))
        self.min_new.fill_(int(min_new_tokens))

    def _warm_and_capture(self, ids, attn) -> None:
        """Compile on a few real steps, then capture one step as a CUDA graph (state is reset by the next prefill)."""
        w = min(ids.shape[1], self.L - 8)
        self._prefill(ids[:, -w:], attn[:, -w:])
        if self.use_graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    self.step_fn()
            torch.cuda.current_stream().wait_stream(s)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.step_fn()
                torch.cuda.synchronize()
                self.graph = graph
            except Exception as e:  # still right, only slower: the step runs un-captured
                self.capture_error = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture of the decode step failed (%s); decoding without it",
                            self.capture_error.splitlines()[0][:300])
        else:
            self.step_fn()
        self.ready = True

    # -- public -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, eos_token_ids: Sequence[int],
                 pad_token_id: int, min_new_tokens: int = 0, check_every: int = 8) -> torch.Tensor:
        b, w = ids.shape
        if b != self.b or w + max_new_tokens > self.L:
            raise ValueError(f"batch {b} x {w}+{max_new_tokens} tokens does not fit this decoder "
                             f"(batch {self.b}, cache {self.L})")
        ids, attn = ids.to(self.dev), attn.to(self.dev)
        self._set_tokens(eos_token_ids, pad_token_id, min_new_tokens)
        if not self.ready:
            self._warm_and_capture(ids, attn)
        self._prefill(ids, attn)
        steps = 1
        while steps < max_new_tokens:
            if steps % check_every == 0 and bool(self.done.all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step_fn()
            steps += 1
        new = self.out[:, :steps]
        # generate stops at the step where the last row ended: cut the pad steps decoded after that
        ended = torch.isin(new, self.eos)
        if bool(ended.any(1).all()):
            steps = int(ended.int().argmax(1).max()) + 1
        return torch.cat([ids, new[:, :steps]], dim=1)


def _decoder(model, batch_size: int, max_cache_len: int, n_eos: int, compile: bool) -> GraphDecoder:
    """One decoder per shape, kept on the model: the compiled code and the CUDA graph are built once."""
    store = model.__dict__.setdefault("_ftkit_graph_decoders", {})
    key = (batch_size, max_cache_len, n_eos, compile)
    if key not in store:
        d = GraphDecoder(model, batch_size, max_cache_len, compile=compile)
        d.eos = torch.zeros(n_eos, dtype=torch.long, device=d.dev)
        store[key] = d
    return store[key]


def graph_generate(model, ids: torch.Tensor, attn: torch.Tensor, *, max_new_tokens: int, eos_token_ids: Sequence[int],
             pad_token_id: int, max_cache_len: int, min_new_tokens: int = 0, compile: bool = True) -> torch.Tensor:
    """`model.generate(input_ids=ids, attention_mask=attn, do_sample=False, ...)`, one CUDA graph a step."""
    n_eos = max(1, len({int(e) for e in eos_token_ids}))
    d = _decoder(model, ids.shape[0], max_cache_len, n_eos, compile)
    return d.generate(ids, attn, max_new_tokens, eos_token_ids, pad_token_id, min_new_tokens)

