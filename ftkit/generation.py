"""Generation for every stage that answers prompts (inference, evaluation, the merge check's prompts, the
benchmarks): loading a run's weights (merged, or base + adapter) with its frozen prompt template, batched and
streamed generation, the static KV cache, and greedy decoding as one CUDA graph on GPUs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .cli import log
from .config import Config, InferenceCfg
from .errors import UserError
from .models import (
    attach_adapter,
    check_finite_weights,
    check_same_base,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    read_adapter_config,
    resolve_model,
    torch_dtype,
)
from .paths import RunDir
from .prompts import PromptTemplate

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
# Greedy only, repetition_penalty 1: other settings go through `model.generate` (batch_runner).


class GraphDecoder:
    """Fixed batch size and cache length; reused across calls (the CUDA graph and compiled code stay valid)."""

    def __init__(
        self, model, batch_size: int, max_cache_len: int, *, compile: bool = True, cuda_graph: bool | None = None
    ):
        from transformers import StaticCache

        self.model, self.b, self.L = model, batch_size, max_cache_len
        dev = model.device
        self.dev = dev
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        z = dict(device=dev, dtype=torch.long)
        self.tok = torch.zeros(batch_size, 1, **z)
        self.posid = torch.zeros(batch_size, 1, **z)
        self.pos = torch.zeros(1, **z)  # cache slot of the token being decoded
        self.n = torch.zeros(1, **z)  # index of the token being produced
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
        logits = self.model(
            input_ids=self.tok,
            attention_mask=self.mask,
            position_ids=self.posid,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        self._select(logits)
        self.posid += 1
        self.pos += 1

    # -- setup --------------------------------------------------------------------------------------
    def _prefill(self, ids: torch.Tensor, attn: torch.Tensor) -> None:
        """The prompt through the model eagerly (as generate's prefill), then the first token."""
        self.cache.reset()
        w = ids.shape[1]
        position_ids = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1)
        logits = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
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
                log.warning(
                    "CUDA graph capture of the decode step failed (%s); decoding without it",
                    self.capture_error.splitlines()[0][:300],
                )
        else:
            self.step_fn()
        self.ready = True

    # -- public -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        attn: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        min_new_tokens: int = 0,
        check_every: int = 8,
    ) -> torch.Tensor:
        b, w = ids.shape
        if b != self.b or w + max_new_tokens > self.L:
            raise ValueError(
                f"batch {b} x {w}+{max_new_tokens} tokens does not fit this decoder (batch {self.b}, cache {self.L})"
            )
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


def graph_generate(
    model,
    ids: torch.Tensor,
    attn: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_cache_len: int,
    min_new_tokens: int = 0,
    compile: bool = True,
) -> torch.Tensor:
    """`model.generate(input_ids=ids, attention_mask=attn, do_sample=False, ...)`, one CUDA graph a step."""
    n_eos = max(1, len({int(e) for e in eos_token_ids}))
    d = _decoder(model, ids.shape[0], max_cache_len, n_eos, compile)
    return d.generate(ids, attn, max_new_tokens, eos_token_ids, pad_token_id, min_new_tokens)


# -- loading a run for generation, and batched / streamed generation ---------------------------------------


def choose_weights(cfg: Config, run: RunDir, use: str, adapter: Path | None = None) -> str:
    if adapter is not None:
        use = "adapter"
    adapter = adapter or run.adapter
    if use == "auto":
        use = "merged" if (run.merged / "config.json").is_file() else "adapter"
    if use == "merged" and not (run.merged / "config.json").is_file():
        raise UserError(f"no merged model in '{run.merged}'; run merge_adapter.py first or pass --adapter")
    if use == "adapter" and not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"no adapter in '{adapter}'; run finetune.py first (or check paths.output_dir"
            f"{' and --adapter DIR' if adapter != run.adapter else ''})"
        )
    return use


def load_for_inference(cfg: Config, run: RunDir, use: str, adapter: Path | None = None):
    """(model, tokenizer, template, what) for generation; `what` says which weights answered.

    `adapter`: another adapter folder to put over the base instead of <run>/adapter (implies use="adapter");
    its own run's prompt_template.json is used when it sits beside it.
    """
    from safetensors import SafetensorError

    use = choose_weights(cfg, run, use, adapter)
    adapter = adapter or run.adapter
    device = pick_device(cfg.inference.device)
    dtype = torch_dtype(cfg.model.dtype)
    own_template = adapter.parent / "prompt_template.json"
    template = PromptTemplate.load(own_template if use == "adapter" and own_template.is_file() else run.prompt_template)
    where = run.merged if use == "merged" else cfg.model.name_or_path
    try:
        if use == "merged":
            model = load_causal_lm(cfg, str(run.merged), True, dtype=dtype, device_map={"": device})
            tok = load_tokenizer(cfg, str(run.merged), True)
        else:
            source, offline = resolve_model(cfg.model)
            model = load_causal_lm(cfg, source, offline, dtype=dtype, device_map={"": device})
            tok = load_tokenizer(cfg, source, offline)
            if use == "adapter":
                where = adapter
                check_same_base(read_adapter_config(adapter), cfg.model.name_or_path)
                model = attach_adapter(model, adapter)
    except SafetensorError as e:
        raise UserError(
            f"the weights in '{where}' are corrupt ({str(e).splitlines()[0][:120]}); re-run the stage "
            "that wrote them (merge_adapter.py or finetune.py), or re-download the base"
        ) from None
    check_finite_weights(model, where)
    model.eval()
    cache, compiled = decode_settings(cfg.inference)
    log.info(
        "decoding with a %s KV cache%s",
        cache,
        ", decode step compiled (CUDA graphs on CUDA; the first batch compiles)" if compiled else "",
    )
    log.info(
        "answering with %s",
        {"merged": run.merged, "adapter": f"base + {adapter}", "base": f"base model {cfg.model.name_or_path}"}[use],
    )
    return model, tok, template, use


FAST_DEVICES = ("cuda",)  # where batch_runner decodes through graph_generate


STATIC_CACHE_STEP = 256  # static KV caches are sized in steps of this many tokens: few sizes, few recompiles


def decode_settings(icfg: InferenceCfg) -> tuple[str, bool]:
    """(cache_implementation, compile) with "auto" resolved for the device the model is loaded on: static cache +
    compiled decode step (CUDA graphs) on CUDA, dynamic cache + eager on CPU."""
    cuda = pick_device(icfg.device) == "cuda"
    cache = icfg.cache_implementation
    if cache == "auto":
        cache = "static" if cuda or icfg.compile is True else "dynamic"
    compiled = (cuda and cache == "static") if icfg.compile == "auto" else bool(icfg.compile)
    return cache, compiled


def static_cache_len(longest_prompt: int, max_new_tokens: int, limit: int | None) -> int:
    n = -(-(longest_prompt + max_new_tokens) // STATIC_CACHE_STEP) * STATIC_CACHE_STEP
    return min(n, limit) if limit else n


def reusable_cache(model, kw: dict):
    """With a static cache (kw from generation_kwargs plus max_cache_len): one StaticCache built here, taken out of
    kw, to pass as past_key_values and reset before each call. The same tensors every call keep the CUDA graphs
    captured on the first batch replaying, where a new cache per call would be captured again each time."""
    if kw.get("cache_implementation") != "static":
        return None
    from transformers import StaticCache

    del kw["cache_implementation"]
    return StaticCache(config=model.config, max_cache_len=kw.pop("max_cache_len"))


def batch_runner(model, icfg: InferenceCfg, kw: dict, fast: bool = True):
    """run(ids, attention_mask) -> output ids (prompt + new tokens) for one left-padded batch, given kw from
    generation_kwargs (+ max_cache_len when static). Greedy decoding with the static cache on CUDA (the default
    there) goes through graph_generate: the whole decode step (compiled when inference.compile resolves on)
    is one CUDA graph, no per-step host work, the same tokens as model.generate. Anything else (sampling,
    repetition_penalty, the dynamic cache, CPU) goes through model.generate, one static cache reused across calls."""
    import torch

    kw = dict(kw)
    if (
        fast
        and kw.get("cache_implementation") == "static"
        and not kw["do_sample"]
        and kw["repetition_penalty"] == 1.0
        and model.device.type in FAST_DEVICES
    ):
        eos = kw["eos_token_id"]
        eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = kw["pad_token_id"] if kw["pad_token_id"] is not None else (eos[0] if eos else 0)

        def run_fast(ids, mask):
            return graph_generate(
                model,
                ids,
                mask,  # moved to the model's device there
                max_new_tokens=kw["max_new_tokens"],
                eos_token_ids=eos,
                pad_token_id=pad,
                max_cache_len=kw["max_cache_len"],
                min_new_tokens=kw.get("min_new_tokens") or 0,
                compile=decode_settings(icfg)[1],
            )

        return run_fast
    cache = reusable_cache(model, kw)

    def run(ids, mask):
        extra = {}
        if cache is not None:
            cache.reset()
            extra["past_key_values"] = cache
        with torch.no_grad():
            return model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kw, **extra)

    return run


def generation_kwargs(icfg: InferenceCfg, template: PromptTemplate, tok) -> dict:
    kw = dict(
        max_new_tokens=icfg.max_new_tokens,
        do_sample=icfg.do_sample,
        repetition_penalty=icfg.repetition_penalty,
        pad_token_id=tok.pad_token_id,
        eos_token_id=template.stop_token_ids or tok.eos_token_id,
    )
    if icfg.do_sample:
        kw.update(temperature=icfg.temperature, top_p=icfg.top_p, top_k=icfg.top_k)
    else:  # keep generation_config's sampling defaults from warning about being ignored
        kw.update(temperature=None, top_p=None, top_k=None)
    cache, compiled = decode_settings(icfg)
    if cache == "static":
        # With a static cache, transformers compiles the decode step itself on CUDA (CompileConfig defaults:
        # inductor, mode "reduce-overhead" = CUDA graphs); the prefill stays eager. Callers add max_cache_len.
        kw["cache_implementation"] = "static"
        if not compiled:
            kw["disable_compile"] = True
        elif pick_device(icfg.device) != "cuda":  # compile=true on CPU: no CUDA graphs there
            from transformers import CompileConfig

            cc = CompileConfig(mode="default")
            cc._compile_all_devices = True
            kw["compile_config"] = cc
    return kw


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def fits_context(model, prompt_tokens: int, max_new_tokens: int) -> bool:
    limit = context_limit(model)
    return not limit or prompt_tokens + max_new_tokens <= limit


def check_fits_context(
    model,
    prompt_tokens: int,
    max_new_tokens: int,
    what: str = "the prompt",
    fix: str = "shorten it or lower inference.max_new_tokens",
) -> None:
    """The one-line error for a prompt that leaves no room for its answer in the model's context."""
    if not fits_context(model, prompt_tokens, max_new_tokens):
        raise UserError(
            f"{what} is {prompt_tokens} tokens; with inference.max_new_tokens={max_new_tokens} it "
            f"exceeds the model's context of {context_limit(model)}; {fix}"
        )


# What generation answers: an Alpaca (instruction, input) pair, or a conversation ending with a user turn.
Prompt = tuple[str, str | None] | list[dict]


def prompt_ids(tok, template: PromptTemplate, prompt: Prompt) -> list[int]:
    if isinstance(prompt, list):
        return template.messages_prompt_ids(tok, prompt)
    instruction, input_text = prompt
    if not instruction or not instruction.strip():
        raise UserError("the prompt is empty; pass some text with --prompt")
    return template.prompt_ids(tok, instruction, input_text or None)


def encode_prompts(model, tok, template: PromptTemplate, rows: list[Prompt], max_new_tokens: int) -> list[list[int]]:
    out = []
    for prompt in rows:
        ids = prompt_ids(tok, template, prompt)
        check_fits_context(model, len(ids), max_new_tokens)
        out.append(ids)
    return out


def generate(
    model,
    tok,
    template: PromptTemplate,
    rows: list[Prompt],
    icfg: InferenceCfg,
    progress: bool = False,
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> list[str]:
    """Batched greedy/sampled generation: prompts sorted by length (less padding), left-padded.

    on_batch(indices, answers) is called after each batch with the row indices it answered (for writing
    results out as they come); progress shows a bar counted in prompts.
    """
    import torch
    from tqdm import tqdm

    encoded = encode_prompts(model, tok, template, rows, icfg.max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    kw = generation_kwargs(icfg, template, tok)
    batches = [order[i : i + icfg.batch_size] for i in range(0, len(order), icfg.batch_size)]
    static = kw.get("cache_implementation") == "static"
    if static:  # one cache, sized for the whole input, so the decode step is compiled and captured once
        kw["max_cache_len"] = static_cache_len(
            max(map(len, encoded), default=0), icfg.max_new_tokens, context_limit(model)
        )
    run_batch = batch_runner(model, icfg, kw)
    bar = tqdm(total=len(encoded), desc="generating", unit="prompt", disable=not progress, file=sys.stderr)
    for batch in batches:
        width = max(len(encoded[i]) for i in batch)
        # A short last batch is filled up with copies of its first row (answers dropped): a new batch size
        # would cost a recompile, the extra rows almost nothing (decoding is bound by reading the weights).
        fill = icfg.batch_size - len(batch) if static and len(batches) > 1 else 0
        # Left padding keeps every prompt's last token at the end, where generation continues from.
        ids = torch.full((len(batch) + fill, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch) + fill, width), dtype=torch.long)
        for row, i in enumerate(batch + [batch[0]] * fill):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            mask[row, width - n :] = 1
        out = run_batch(ids, mask)
        for row, i in enumerate(batch):
            answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(list(batch), [answers[i] for i in batch])
        bar.update(len(batch))
    bar.close()
    return answers


def stream_one(
    model, tok, template: PromptTemplate, instruction: str, input_text: str | None, icfg: InferenceCfg
) -> str:
    import torch
    from transformers import TextStreamer

    ids = encode_prompts(model, tok, template, [(instruction, input_text)], icfg.max_new_tokens)[0]
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = generation_kwargs(icfg, template, tok)
    if kw.get("cache_implementation") == "static":  # transformers keeps the largest size seen: few recompiles
        kw["max_cache_len"] = static_cache_len(len(ids), icfg.max_new_tokens, context_limit(model))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device), streamer=streamer, **kw)
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
