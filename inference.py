"""Generate with the fine-tuned model, using exactly the prompt template it was trained with.

Reads:  <run>/config.yaml and <run>/prompt_template.json; <run>/merged/ when present, else the base at
        `model.name_or_path` plus <run>/adapter/ (or force either with --merged / --adapter [DIR];
        --adapter DIR puts another adapter trained on the same base over it, unmerged;
        --base answers with the untouched base model, for comparison).
        --input-file: JSON lines, one prompt a line: {"instruction": ..., "input": ..., "id": ...}
        ("prompt" is accepted for "instruction"; "input" and "id" are optional; other keys are copied through).
Writes: --prompt: the answer to stdout, streamed token by token.
        --input-file: --output-file (default <input>.answers.jsonl): each input row plus "id" (the row's own
        id, else its 0-based index in the file) and "response". Appended and flushed batch by batch, so a
        crash or Ctrl+C loses at most the batch in flight; running again skips the rows already answered (a
        line cut short by a crash is dropped) and, once all are answered, rewrites the file in input order.
        --chat: an interactive REPL on the terminal; /save PATH writes the transcript as JSON.

Chat: multi-turn, streamed. Commands: /reset (forget the conversation), /system TEXT (set the system
prompt; /system alone restores the training one), /save PATH, /help, /quit (or Ctrl+D). Ctrl+C while
the model answers stops it and keeps the partial answer in the history. Chat-template runs render the
whole conversation with the chat template frozen at training time. Alpaca runs were trained on single
turns, so each turn is one Alpaca prompt: the new message is the instruction and the earlier turns are
folded into the Input field as "User: ..." / "Assistant: ..." lines.

Run:
    python inference.py --prompt "Give three tips for staying healthy."
    python inference.py --prompt "Summarize this." --input "Some text ..." inference.do_sample=true
    python inference.py --config configs/demo.yaml --adapter --prompt "..."
    python inference.py --adapter runs/other/adapter --prompt "..."     # another adapter, same base
    python inference.py --input-file prompts.jsonl --output-file answers.jsonl inference.batch_size=32
    python inference.py --chat
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ftkit.config import Config, InferenceCfg

from ftkit.cli import build_parser, parse_args
from ftkit.cli import UserError, log, run_main
from ftkit.jsonl import fail_if_bad, parse_jsonl, read_text
from ftkit.models import check_finite_weights, load_causal_lm, load_tokenizer, pick_device, resolve_model, torch_dtype
from ftkit.paths import RunDir, atomic_write_json, atomic_write_text, stage_config
from ftkit.runlock import clean_tmp_leftovers
from ftkit.prompts import PromptTemplate


def choose_weights(cfg: Config, run: RunDir, use: str, adapter: Path | None = None) -> str:
    if adapter is not None:
        use = "adapter"
    adapter = adapter or run.adapter
    if use == "auto":
        use = "merged" if (run.merged / "config.json").is_file() else "adapter"
    if use == "merged" and not (run.merged / "config.json").is_file():
        raise UserError(f"no merged model in '{run.merged}'; run merge_adapter.py first or pass --adapter")
    if use == "adapter" and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no adapter in '{adapter}'; run finetune.py first (or check paths.output_dir"
                        f"{' and --adapter DIR' if adapter != run.adapter else ''})")
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
    template = PromptTemplate.load(own_template if use == "adapter" and own_template.is_file()
                                   else run.prompt_template)
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
                from merge_adapter import attach_adapter, check_same_base, read_adapter_config
                where = adapter
                check_same_base(read_adapter_config(adapter), cfg.model.name_or_path)
                model = attach_adapter(model, adapter)
    except SafetensorError as e:
        raise UserError(f"the weights in '{where}' are corrupt ({str(e).splitlines()[0][:120]}); re-run the stage "
                        "that wrote them (merge_adapter.py or finetune.py), or re-download the base") from None
    check_finite_weights(model, where)
    model.eval()
    cache, compiled = decode_settings(cfg.inference)
    log.info("decoding with a %s KV cache%s", cache, ", decode step compiled (CUDA graphs on CUDA; the first batch "
             "compiles)" if compiled else "")
    log.info("answering with %s", {"merged": run.merged, "adapter": f"base + {adapter}",
                                   "base": f"base model {cfg.model.name_or_path}"}[use])
    return model, tok, template, use


FAST_DEVICES = ("cuda",)  # where batch_runner uses ftkit.generation (graph_generate)
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
    there) goes through ftkit.generation (graph_generate): the whole decode step (compiled when inference.compile resolves on) is one
    CUDA graph, no per-step host work, the same tokens as model.generate. Anything else (sampling,
    repetition_penalty, the dynamic cache, CPU) goes through model.generate, one static cache reused across calls."""
    import torch
    kw = dict(kw)
    if (fast and kw.get("cache_implementation") == "static" and not kw["do_sample"]
            and kw["repetition_penalty"] == 1.0 and model.device.type in FAST_DEVICES):
        from ftkit import generation
        eos = kw["eos_token_id"]
        eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = kw["pad_token_id"] if kw["pad_token_id"] is not None else (eos[0] if eos else 0)

        def run_fast(ids, mask):
            return generation.graph_generate(model, ids, mask,  # moved to the model's device there
                                    max_new_tokens=kw["max_new_tokens"], eos_token_ids=eos,
                                    pad_token_id=pad, max_cache_len=kw["max_cache_len"],
                                    min_new_tokens=kw.get("min_new_tokens") or 0,
                                    compile=decode_settings(icfg)[1])
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
    kw = dict(max_new_tokens=icfg.max_new_tokens, do_sample=icfg.do_sample,
              repetition_penalty=icfg.repetition_penalty, pad_token_id=tok.pad_token_id,
              eos_token_id=template.stop_token_ids or tok.eos_token_id)
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


def encode_prompts(tok, template: PromptTemplate, rows: list[tuple[str, str | None]], limit: int | None,
                   max_new_tokens: int) -> list[list[int]]:
    out = []
    for instruction, input_text in rows:
        if not instruction or not instruction.strip():
            raise UserError("the prompt is empty; pass some text with --prompt")
        ids = template.prompt_ids(tok, instruction, input_text or None)
        if limit and len(ids) + max_new_tokens > limit:
            raise UserError(f"the prompt is {len(ids)} tokens; with inference.max_new_tokens={max_new_tokens} it "
                            f"exceeds the model's context of {limit}; shorten it or lower inference.max_new_tokens")
        out.append(ids)
    return out


def generate(model, tok, template: PromptTemplate, rows: list[tuple[str, str | None]], icfg: InferenceCfg,
             progress: bool = False, on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """Batched greedy/sampled generation: prompts sorted by length (less padding), left-padded.

    on_batch(indices, answers) is called after each batch with the row indices it answered (for writing
    results out as they come); progress shows a bar counted in prompts.
    """
    import torch
    from tqdm import tqdm
    encoded = encode_prompts(tok, template, rows, context_limit(model), icfg.max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    kw = generation_kwargs(icfg, template, tok)
    batches = [order[i:i + icfg.batch_size] for i in range(0, len(order), icfg.batch_size)]
    static = kw.get("cache_implementation") == "static"
    if static:  # one cache, sized for the whole input, so the decode step is compiled and captured once
        kw["max_cache_len"] = static_cache_len(max(map(len, encoded), default=0), icfg.max_new_tokens,
                                               context_limit(model))
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
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        out = run_batch(ids, mask)
        for row, i in enumerate(batch):
            answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(list(batch), [answers[i] for i in batch])
        bar.update(len(batch))
    bar.close()
    return answers


def stream_one(model, tok, template: PromptTemplate, instruction: str, input_text: str | None,
               icfg: InferenceCfg) -> str:
    import torch
    from transformers import TextStreamer
    ids = encode_prompts(tok, template, [(instruction, input_text)], context_limit(model), icfg.max_new_tokens)[0]
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = generation_kwargs(icfg, template, tok)
    if kw.get("cache_implementation") == "static":  # transformers keeps the largest size seen: few recompiles
        kw["max_cache_len"] = static_cache_len(len(ids), icfg.max_new_tokens, context_limit(model))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device), streamer=streamer, **kw)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def held_out_rows(run: RunDir, n: int) -> list[dict]:
    import json
    path = run.root / "eval_rows.jsonl"
    if not path.is_file():
        raise UserError(f"'{path}' is missing; --compare needs a run made by finetune.py")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise UserError(f"'{path}' holds no held-out rows; set data.eval_size above 0 and train again")
    return rows[:n]


def compare(cfg: Config, run: RunDir, n: int) -> list[dict]:
    """Base model vs fine-tuned model on n held-out rows, printed side by side."""
    rows = held_out_rows(run, n)
    pairs = [(r["instruction"], r.get("input") or None) for r in rows]
    results = {}
    for use in ("base", cfg.inference.use):
        model, tok, template, what = load_for_inference(cfg, run, use)
        results["base" if use == "base" else "tuned"] = generate(model, tok, template, pairs, cfg.inference)
        del model
    out = []
    for r, b, t in zip(rows, results["base"], results["tuned"]):
        prompt = r["instruction"] + (f"\n  input: {r['input']}" if r.get("input") else "")
        print(f"\n### {prompt}\n  reference : {r['output'][:200]}\n  base      : {b}\n  fine-tuned: {t}")
        out.append({"instruction": r["instruction"], "input": r.get("input", ""), "reference": r["output"],
                    "base": b, "fine_tuned": t})
    return out

# -- answering a file of prompts ---------------------------------------------------------------------------------
def read_prompt_file(path: Path) -> list[dict]:
    """The rows of a JSONL prompt file, every line checked before any model is loaded.

    Each row: {"key": canonical id, "id": its id (given, else the 0-based row index), "instruction",
    "input", "row": the object as read, "line": its line number}.
    """
    text = read_text(path, "input file", "pass JSON lines with an 'instruction' per line")
    parsed, bad = parse_jsonl(path, text)
    rows, seen = [], {}
    for index, (n, obj) in enumerate(parsed):
        rid = index
        if not isinstance(obj, dict):
            bad.append(f"line {n} is not a JSON object")
            continue
        instruction = obj.get("instruction", obj.get("prompt"))
        if not isinstance(instruction, str) or not instruction.strip():
            bad.append(f"line {n} has an empty or missing 'instruction' (or 'prompt')")
            continue
        input_text = obj.get("input")
        if input_text is not None and not isinstance(input_text, str):
            bad.append(f"line {n}: 'input' must be a string")
            continue
        if "id" in obj:
            rid = obj["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                bad.append(f"line {n}: 'id' must be a string or an integer")
                continue
        key = json.dumps(rid)
        if key in seen:
            bad.append(f"line {n} repeats the id {key} of line {seen[key]}")
            continue
        seen[key] = n
        rows.append({"key": key, "id": rid, "instruction": instruction, "input": input_text or None, "row": obj,
                     "line": n})
    bad.sort(key=lambda b: int(b.split()[1].rstrip(":")))  # malformed and invalid lines, in file order
    fail_if_bad(path, bad)
    if not rows:
        raise UserError(f"'{path}' holds no prompts; write one JSON object per line with an 'instruction'")
    return rows


def read_done(path: Path) -> dict[str, dict]:
    """Rows already answered in an output file, by canonical id. A last line cut short by a crash is
    dropped from the file (its row is answered again); any other unreadable line is an error."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise UserError(f"--output-file '{path}' is not a file")
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    not_ours = (f"--output-file '{path}' is not an answer file written by inference.py (JSON lines with 'id' and "
                "'response'); it is left untouched: move it away or pass another --output-file")
    done: dict[str, dict] = {}
    # Every complete line is checked before anything is changed: the file may be the user's own data.
    for n, line in enumerate(data[:cut].decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "id" not in row or "response" not in row:
            raise UserError(f"--output-file '{path}' is not an answer file written by inference.py: line {n} is not an "
                            "answer row (JSON with 'id' and 'response'); it is left untouched: move it away or pass "
                            "another --output-file")
        done[json.dumps(row["id"])] = row
    if tail.strip():
        # answer_row puts "id" first, so a line of ours cut short starts like this. Anything else, or a file
        # with no complete answer before the cut, is not a crashed answer file.
        if not done or not tail.startswith(b'{"id": '):
            raise UserError(not_ours)
        log.warning("'%s' ends in a line cut short by an interrupted write; dropping it (that row is answered "
                    "again)", path)
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
    return done


def answer_row(r: dict, answer: str) -> dict:
    return {"id": r["id"], **{k: v for k, v in r["row"].items() if k != "id"}, "response": answer}


def answer_file(cfg: Config, run: RunDir, input_file: Path, output_file: Path | None = None, use: str | None = None,
                adapter: Path | None = None) -> list[dict]:
    """Answer every row of `input_file` into `output_file` (JSONL), resumably; returns the rows in input order."""
    rows = read_prompt_file(input_file)
    output_file = output_file or input_file.with_name(input_file.stem + ".answers.jsonl")
    if output_file.resolve() == input_file.resolve():
        raise UserError(f"--output-file '{output_file}' is the input file; write the answers elsewhere")
    probe = output_file.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to '{probe}'; choose a writable --output-file")
    done = read_done(output_file)
    clean_tmp_leftovers(output_file.parent, names=(output_file.name,))  # a killed final rewrite's temporary file
    todo = [r for r in rows if r["key"] not in done]
    log.info("%d prompts in %s: %d already answered in %s, %d to go", len(rows), input_file, len(rows) - len(todo),
             output_file, len(todo))
    if todo:
        model, tok, template, _ = load_for_inference(cfg, run, use or cfg.inference.use, adapter)
        limit, new = context_limit(model), cfg.inference.max_new_tokens
        for r in todo:  # name the line before any generation starts
            n = len(template.prompt_ids(tok, r["instruction"], r["input"]))
            if limit and n + new > limit:
                raise UserError(f"{input_file} line {r['line']}: the prompt is {n} tokens; with "
                                f"inference.max_new_tokens={new} it exceeds the model's context of {limit}; "
                                "shorten it or lower inference.max_new_tokens")
        output_file.parent.mkdir(parents=True, exist_ok=True)
        with open(output_file, "a", encoding="utf-8") as f:
            def write(indices: list[int], answers: list[str]) -> None:
                # One write per batch, then flush + fsync: a crash can only cut the batch in flight short.
                out = [answer_row(todo[i], a) for i, a in zip(indices, answers)]
                f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
                f.flush()
                os.fsync(f.fileno())
                done.update((json.dumps(o["id"]), o) for o in out)
            generate(model, tok, template, [(r["instruction"], r["input"]) for r in todo], cfg.inference,
                     progress=True, on_batch=write)
    ordered = [done[r["key"]] for r in rows]
    keys = {r["key"] for r in rows}
    extra = [row for key, row in done.items() if key not in keys]
    if extra:
        log.warning("%d rows in %s have ids that are not in %s; kept at the end", len(extra), output_file, input_file)
    # All answered: rewrite in input order (atomically), so the file reads like the input.
    atomic_write_text(output_file, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in ordered + extra))
    log.info("wrote %d answers to %s", len(ordered), output_file)
    return ordered


def is_transcript(path: Path) -> bool:
    """A file /save wrote (and may replace): JSON with the transcript's keys."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"saved", "messages", "template"} <= obj.keys()


# -- chat --------------------------------------------------------------------------------------------------------
CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone "
             "restores the training one), /save PATH (transcript as JSON), /quit. Ctrl+C stops an answer.")


class StopFlag:
    """Set from the SIGINT handler; generate checks it after every token (a StoppingCriteria)."""

    def __init__(self):
        self.stop = False

    def criteria(self):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        flag = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), flag.stop, dtype=torch.bool, device=input_ids.device)
        return StoppingCriteriaList([_Stop()])

    @contextlib.contextmanager
    def on_sigint(self):
        """While inside: Ctrl+C sets the flag instead of raising KeyboardInterrupt."""
        self.stop = False
        try:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: setattr(self, "stop", True))
        except ValueError:  # not the main thread: no handler, generation runs to its end
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class ChatSession:
    """A multi-turn conversation with the model in the training prompt format (see the module docstring)."""

    def __init__(self, model, tok, template: PromptTemplate, icfg: InferenceCfg, what: str = "model", out=None):
        self.model, self.tok, self.template, self.icfg, self.what = model, tok, template, icfg, what
        self.system: str | None = template.system_prompt
        self.history: list[dict] = []
        self.out = out or sys.stdout
        self.flag = StopFlag()

    def print(self, *args, **kw) -> None:
        print(*args, file=self.out, flush=True, **kw)

    def prompt_ids(self, message: str, history: list[dict]) -> list[int]:
        turns = [{"role": m["role"], "content": m["content"]} for m in history]
        if self.template.kind == "chat":
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + turns
            text = self.tok.apply_chat_template(msgs + [{"role": "user", "content": message}], tokenize=False,
                                                add_generation_prompt=True, chat_template=self.template.chat_template)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        # Alpaca was trained on single turns: the earlier turns become the Input field.
        context = "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)
        return replace(self.template, system_prompt=self.system).prompt_ids(self.tok, message, context or None)

    def fit(self, message: str) -> tuple[list[int], int]:
        """Prompt ids for the next turn, dropping the oldest turns until prompt + answer fit the context."""
        limit, new = context_limit(self.model), self.icfg.max_new_tokens
        history, dropped = list(self.history), 0
        ids = self.prompt_ids(message, history)
        while limit and len(ids) + new > limit and history:
            history, dropped = history[2:], dropped + 1
            ids = self.prompt_ids(message, history)
        if limit and len(ids) + new > limit:
            raise UserError(f"the message is {len(ids)} tokens; with inference.max_new_tokens={new} it does not fit "
                            f"the model's context of {limit}; send something shorter")
        return ids, dropped

    def reply(self, message: str) -> tuple[str, bool]:
        """Stream the answer to `message`; (answer, interrupted). Both turns are added to the history."""
        import torch
        from transformers import TextStreamer
        ids, dropped = self.fit(message)
        if dropped:
            self.print(f"(the oldest {dropped} exchange(s) no longer fit the context and are left out)")
        kw = generation_kwargs(self.icfg, self.template, self.tok)
        if kw.get("cache_implementation") == "static":
            kw["max_cache_len"] = static_cache_len(len(ids), self.icfg.max_new_tokens, context_limit(self.model))
        streamer = TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        with self.flag.on_sigint(), torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids], device=self.model.device), streamer=streamer,
                                      stopping_criteria=self.flag.criteria(), **kw)
        interrupted = self.flag.stop
        answer = self.tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        self.print("\n[stopped; the partial answer is kept]" if interrupted else "")
        self.history.append({"role": "user", "content": message})
        self.history.append({"role": "assistant", "content": answer, **({"interrupted": True} if interrupted else {})})
        return answer, interrupted

    def transcript(self) -> dict:  # is_transcript recognises these keys
        return {"saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": self.what, "template": self.template.kind,
                "system": self.system, "messages": self.history, "settings": self.icfg.model_dump(mode="json")}

    def handle(self, line: str) -> bool:
        """One line typed by the user; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.reply(line)
            return True
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "exit", "q"):
            return False
        if cmd == "reset":
            self.history.clear()
            self.print("(conversation cleared)")
        elif cmd == "system":
            self.system = arg or self.template.system_prompt
            self.print(f"(system prompt: {self.system!r})" if self.system else "(no system prompt)")
        elif cmd == "save":
            if not arg:
                self.print("usage: /save PATH")
                return True
            path = Path(arg).expanduser()
            if path.exists() and not is_transcript(path):
                self.print(f"({path} exists and is not a transcript saved by /save; it is left untouched: pick "
                           "another PATH)")
                return True
            try:
                atomic_write_json(path, self.transcript())
                self.print(f"(saved {len(self.history)} messages to {path})")
            except OSError as e:
                self.print(f"(could not save to {path}: {e.strerror or e})")
        elif cmd == "help":
            self.print(CHAT_HELP)
        else:
            self.print(f"unknown command /{cmd}; {CHAT_HELP}")
        return True


def chat(cfg: Config, run: RunDir, use: str | None = None, adapter: Path | None = None,
         read: Callable[[str], str] = input) -> ChatSession:
    """The interactive REPL: read a line, answer it streamed, until /quit or end of input."""
    model, tok, template, what = load_for_inference(cfg, run, use or cfg.inference.use, adapter)
    session = ChatSession(model, tok, template, cfg.inference, what=what)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    session.print(f"chatting with the {what} model ({template.kind} template). {CHAT_HELP}")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            session.print()
            break
        except KeyboardInterrupt:
            session.print("\n(Ctrl+C stops an answer; /quit or Ctrl+D leaves)")
            continue
        try:
            if not session.handle(line):
                break
        except UserError as e:
            session.print(f"error: {e}")
        except KeyboardInterrupt:
            session.print("\n(interrupted)")
    return session


def main(cfg: Config, run: RunDir, prompt: str, input_text: str | None = None, use: str | None = None,
         adapter: Path | None = None) -> str:
    """Answer one prompt, streamed to stdout (see the module docstring for what is read)."""
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt")
    model, tok, template, _ = load_for_inference(cfg, run, use or cfg.inference.use, adapter)
    return stream_one(model, tok, template, prompt, input_text, cfg.inference)


def cli(argv) -> None:
    p = build_parser(__doc__)
    p.add_argument("--prompt", help="the instruction")
    p.add_argument("--compare", type=int, metavar="N",
                   help="answer N held-out rows with the base and the fine-tuned model, side by side")
    p.add_argument("--input", default=None, help="Alpaca's optional input field")
    p.add_argument("--input-file", type=Path, metavar="JSONL", help="answer every prompt in this JSON-lines file")
    p.add_argument("--output-file", type=Path, metavar="JSONL",
                   help="where --input-file's answers go (default <input>.answers.jsonl); resumed if it exists")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat in the terminal")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merged", dest="use", action="store_const", const="merged", help="use <run>/merged")
    g.add_argument("--adapter", nargs="?", const=True, default=None, metavar="DIR",
                   help="base + <run>/adapter, unmerged; or base + the adapter in DIR (trained on the same base)")
    g.add_argument("--base", dest="use", action="store_const", const="base", help="the base model alone")
    a = parse_args(p, argv)
    adapter = None
    if a.adapter is not None:
        a.use = "adapter"
        if isinstance(a.adapter, str):
            if "=" in a.adapter and not Path(a.adapter).is_dir():
                a.overrides.insert(0, a.adapter)  # `--adapter section.key=value`: an override, not a folder
            else:
                adapter = Path(a.adapter).expanduser()
    modes = [m for m, on in (("--prompt", a.prompt is not None), ("--compare", bool(a.compare)),
                             ("--input-file", a.input_file is not None), ("--chat", a.chat)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} do different things; pass one of them")
    if a.output_file is not None and a.input_file is None:
        raise UserError("--output-file needs --input-file (the prompts to answer)")
    if a.prompt is not None and not a.prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt")
    if a.input_file is not None:
        read_prompt_file(a.input_file)  # a bad line fails before any run or model is looked at
    cfg, run = stage_config(a.config, a.overrides)
    if a.compare:
        compare(cfg, run, a.compare)
    elif a.input_file is not None:
        answer_file(cfg, run, a.input_file, a.output_file, a.use, adapter)
    elif a.chat:
        chat(cfg, run, a.use, adapter)
    elif a.prompt is None:
        raise UserError("nothing to do; pass --prompt TEXT, --input-file JSONL, --chat or --compare N")
    else:
        main(cfg, run, a.prompt, a.input, a.use, adapter)


if __name__ == "__main__":
    run_main(cli)
