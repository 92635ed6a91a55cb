"""Kernels and module swaps for speed: padding-free attention without cross-row contamination, the tiled MLP
and offloaded checkpoints for long rows, and the CUDA-graph greedy decoder. What to switch on is decided
by ftkit/plan.py; the memory / speed model behind that is ftkit/estimate.py.

Padding-free batches concatenate a micro-batch's rows into one row whose position_ids restart at 0 for
every original row (TRL's DataCollatorForLanguageModeling(padding_free=True), or its bfd packing). Plain
SDPA in transformers 5 sees restarting position_ids, builds a dense (L x L) block-diagonal boolean mask and
hands it to SDPA, which then runs the memory-efficient kernel over the whole packed row: correct, but the
attention costs O(L^2) for the packed length L (16k tokens: 64x the work of 64 rows of 256 tokens) and the
mask alone is L^2 bytes. The "sdpa_varlen" attention registered here takes the row boundaries
(cu_seq_lens, from the collator or derived from position_ids) and runs torch's variable-length flash
attention (torch.nn.attention.varlen) on the GPU: each row attends only to itself, at the cost of its own
length. On CPU (and wherever that kernel is missing) it runs SDPA row by row. Batches that are not packed
(generation, padded batches) take the ordinary SDPA path unchanged.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .config import log

from .plan import VARLEN_ATTN  # noqa: E402  (the name the plan chooses)
_registered = False
_varlen_fn = None  # torch.nn.attention.varlen.varlen_attn, when this torch has it
_varlen_params: set[str] = set()
_varlen_broken = False


def _load_varlen():
    global _varlen_fn, _varlen_params
    if _varlen_fn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
            _varlen_fn = varlen_attn
            _varlen_params = set(inspect.signature(varlen_attn).parameters)
        except Exception:  # older torch: no varlen module
            _varlen_fn = False
    return _varlen_fn


def varlen_available() -> bool:
    import torch
    return bool(torch.cuda.is_available() and _load_varlen())


def _segments(kwargs: dict, length: int):
    """(cu_seq_lens int32 tensor, max row length) of a packed row, or None when the row is not packed."""
    import torch
    cu, mx = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is not None:
        return cu.to(torch.int32), int(mx) if mx is not None else None
    pos = kwargs.get("position_ids")
    if pos is None or pos.dim() != 2 or pos.shape[0] != 1 or pos.shape[1] != length:
        return None
    starts = (pos[0] == 0).nonzero().flatten()
    if starts.numel() <= 1:
        return None  # one row: plain causal attention is already right
    cu = torch.cat([starts, torch.tensor([length], device=starts.device)]).to(torch.int32)
    return cu, None


def _rowwise_sdpa(q, k, v, cu, scaling):
    """(1, H, L, D) tensors; causal SDPA on each row [cu[i], cu[i+1]) separately."""
    import torch
    import torch.nn.functional as F
    bounds = cu.tolist()
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scaling)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=2)


def _flash_varlen(q, k, v, cu, max_len, scaling):
    """(1, H, L, D) tensors -> (L, H, D) through torch's varlen flash attention (causal, GQA)."""
    fn = _load_varlen()
    qt, kt, vt = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    kw = {"scale": scaling}
    if "enable_gqa" in _varlen_params:
        kw["enable_gqa"] = qt.shape[1] != kt.shape[1]
    elif qt.shape[1] != kt.shape[1]:
        rep = qt.shape[1] // kt.shape[1]
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    if "is_causal" in _varlen_params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # torch >= 2.12 spells causal as a window
    return fn(qt, kt, vt, cu, cu, max_len, max_len, **kw)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """An attention function for transformers' AttentionInterface (same signature as sdpa's)."""
    global _varlen_broken
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    b, _, length, _ = query.shape
    seg = None
    if attention_mask is None and b == 1 and length > 1 and getattr(module, "is_causal", True):
        seg = _segments(kwargs, length)
    if seg is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    cu, max_len = seg
    cu = cu.to(query.device)
    if query.is_cuda and not _varlen_broken and _load_varlen():
        try:
            return _flash_varlen(query, key, value, cu, max_len, scaling).unsqueeze(0), None
        except (RuntimeError, TypeError, ValueError) as e:  # a torch build without the kernel for this dtype/arch
            log.warning("varlen flash attention failed (%s); using row-by-row SDPA", str(e).splitlines()[0])
            _varlen_broken = True
    out = _rowwise_sdpa(query, key, value, cu, scaling)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args, **kwargs):
    """The mask for "sdpa_varlen": none for unpadded batches (packed rows are separated by the attention
    itself, so no L x L mask is built), else SDPA's own mask."""
    from transformers.masking_utils import sdpa_mask
    am = kwargs.get("attention_mask")
    if am is None or (am.dim() == 2 and bool(am.all())):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
        AttentionMaskInterface.register(VARLEN_ATTN, varlen_mask)
        _registered = True
    return VARLEN_ATTN


def use_varlen_attention(model) -> None:
    """Switch a loaded model (or its PEFT wrapper) to the padding-free attention."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(VARLEN_ATTN)
    except Exception:  # older transformers: the config field is what the layers read
        base.config._attn_implementation = VARLEN_ATTN


def liger_available() -> bool:
    import importlib.util
    import torch
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


# -- long rows: tiled MLP and offloaded checkpoints --------------------------------------------------------
def decoder_layers(model) -> list:
    """The repeated blocks that gradient checkpointing wraps (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def use_tiled_mlp(model, chunk_tokens: int | None = None) -> int:
    """Run every decoder layer's MLP over the sequence in chunks of `chunk_tokens` (default: hidden_size, as
    DeepSpeed's TiledMLP), each under its own non-reentrant checkpoint: forward keeps only the chunk inputs, and
    backward rebuilds one chunk's gate/up/activation at a time. The MLP acts on each token alone, so chunking
    the sequence changes no result. Returns the number of MLPs patched.

    The chunking wraps the module's __call__, not its forward: liger-kernel replaces the MLP's forward when the
    Trainer starts, after this has run."""
    chunk = chunk_tokens or int(getattr(getattr(model, "config", None), "hidden_size", 0) or 4096)
    mlps = [layer.mlp for layer in decoder_layers(model) if getattr(layer, "mlp", None) is not None]
    for mlp in mlps:
        _wrap_call(mlp, "_ftkit_tiled", _tiled_call)
        mlp._ftkit_chunk = chunk
    return len(mlps)


def offload_layer_inputs(model, n_layers: int) -> int:
    """Keep the checkpointed inputs of the first `n_layers` decoder layers in (pinned) CPU RAM.

    Not TRL's `activation_offloading`: that offloads everything the whole forward saves, all or nothing, and the
    checkpoints of one very long row (2 bytes x hidden x layers a token: 256 KB for Llama-3-8B, 360 GB for 1.4M
    tokens) can exceed the host's RAM too; offloading only some layers splits them between GPU and host. The
    copies are synchronous (torch's save_on_cpu): at the lengths where this is needed, attention dominates."""
    layers = decoder_layers(model)[:n_layers]
    for layer in layers:
        _wrap_call(layer, "_ftkit_offload", _offloading_call)
    return len(layers)


def _tiled_call(call):
    def __call__(self, x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled() or x.shape[-2] <= self._ftkit_chunk:
            return call(self, x, *args, **kwargs)
        import torch.utils.checkpoint as tc
        return torch.cat([tc.checkpoint(call, self, part, use_reentrant=False)
                          for part in x.split(self._ftkit_chunk, dim=-2)], dim=-2)
    return __call__


def _offloading_call(call):
    def __call__(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return call(self, *args, **kwargs)
        # What the layer saves for backward goes to CPU RAM: under checkpointing that is the layer's input
        # (kept for the recompute), copied back when backward reaches this layer.
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return call(self, *args, **kwargs)
    return __call__


_WRAPPED_CLASSES: dict[tuple[type, str], type] = {}


def _wrap_call(module, marker: str, wrap) -> None:
    """Swap in a subclass of the module's class whose __call__ is wrap(the class's __call__), marked by the
    class attribute `marker` (benchmarks/train_throughput.py undoes it by that mark). It keeps the class name,
    so FSDP wrap policies and repr still see the model's own class, and the state dict keys do not change."""
    cls = type(module)
    if getattr(cls, marker, False):
        return
    if (cls, marker) not in _WRAPPED_CLASSES:
        _WRAPPED_CLASSES[cls, marker] = type(cls.__name__, (cls,), {"__call__": wrap(cls.__call__), marker: True,
                                                                    "__module__": cls.__module__})
    module.__class__ = _WRAPPED_CLASSES[cls, marker]


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
