"""llama.cpp as a library, through llama-cpp-python (an optional install: `make llama-cpp`): its own quantizer for
K-quants, loading a GGUF (with a LoRA adapter GGUF) to check an export where it will run, greedy decoding and
per-token log-probabilities for those checks, and its OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from .cli import log
from .errors import UserError
from .gguf import check_adapter_fits
from .jsonl import loads

INSTALL_HINT = (
    "install llama.cpp's Python binding with `make llama-cpp` (builds llama-cpp-python from source, about 6 "
    "minutes on 2 cores; see the README's GGUF section)"
)


def require(what: str):
    """llama_cpp, or a one-line error naming what needed it and how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"{what} needs llama.cpp, which is not installed: {INSTALL_HINT}") from None
    return llama_cpp


@contextlib.contextmanager
def native_output() -> Iterator[list[str]]:
    """Capture what llama.cpp's C code prints on fd 1/2 (it bypasses Python's streams): kept out of the log and
    handed back, so a failure can show its last lines."""
    out: list[str] = []
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            out.extend(f.read().decode("utf-8", "replace").splitlines())


@contextlib.contextmanager
def refusal_as_user_error(model: Path, lora: Path | None) -> Iterator[None]:
    """Around a llama.cpp load: its native chatter captured, and a refusal turned into one line that gives
    llama.cpp's own reason (its last 'error'/'failed' line) instead of llama-cpp-python's generic exception."""
    with native_output() as lines:
        try:
            yield
            return
        except (ValueError, RuntimeError, OSError) as e:
            err = e
    why = next((ln for ln in reversed(lines) if "error" in ln.lower() or "failed" in ln.lower()), str(err))
    raise UserError(f"llama.cpp cannot load '{model}'{f' with {lora}' if lora else ''}: {why.strip()[:200]}")


def cpu_threads() -> int:
    """llama.cpp's threads: the CPUs this process may run on (its affinity: taskset, a container's cpuset), not all
    the machine's, and no more than OMP_NUM_THREADS when that is set (as torch does). llama.cpp's threads spin-wait
    for each other: on a busy 2-core machine two threads decoded ~30x slower than one."""
    try:
        n = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity outside Linux
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(n, int(omp))) if omp.isdigit() and int(omp) > 0 else n


def quantize(src: Path, dst: Path, file_type: int, threads: int | None = None) -> None:
    """llama.cpp's llama_model_quantize (what `llama-quantize` runs): it chooses each tensor's type for the
    file type (Q4_K_M keeps attn_v/ffn_down at more bits, falls back where rows are not a multiple of 256)."""
    llama_cpp = require("a K-quant (--type q4_k_m, q5_k_m, q6_k, ...)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = threads or cpu_threads()
    with native_output() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        tail = " | ".join(lines[-3:])
        raise RuntimeError(f"llama.cpp's quantizer failed (code {rc}): {tail}")


def load(model: Path, lora: Path | None = None, n_ctx: int = 2048, logits_all: bool = False):
    """A llama_cpp.Llama on the CPU (or the GPU llama-cpp-python was built for). A file llama.cpp refuses is a
    one-line error with llama.cpp's own reason."""
    llama_cpp = require("loading a GGUF in llama.cpp")
    if lora is not None:
        check_adapter_fits(model, lora)
    with refusal_as_user_error(model, lora):
        return llama_cpp.Llama(
            model_path=str(model),
            lora_path=str(lora) if lora else None,
            n_ctx=n_ctx,
            n_threads=cpu_threads(),
            logits_all=logits_all,
            seed=0,
            verbose=False,
        )


def greedy_ids(llm, prompt: list[int], n: int) -> list[int]:
    """The first n greedy tokens after prompt (fewer when an end-of-generation token comes first)."""
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if _is_eog(llm, tok):  # eos and every other end-of-generation token (<|im_end|>, <|eot_id|>)
            break
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def _is_eog(llm, tok: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), tok))


def check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port; choose one from 1 to 65535")
    import errno

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise UserError(
            f"--host {host} is not an address or a known host name; use e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"cannot listen on {host}:{port}: another server is there; pass --port N") from None
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror or e}); pass a --host of this machine "
                "(127.0.0.1, 0.0.0.0) and a --port you may use (1024 and up without root)"
            ) from None


def sampling_defaults(icfg) -> dict:
    """The run's inference settings as request defaults: llama-cpp-python's server otherwise samples at
    temperature 0.8 with repeat_penalty 1.1 and min_p 0.05, and answers differently from inference.py and the
    Ollama Modelfile (which carries the same settings)."""
    return {
        "temperature": icfg.temperature if icfg.do_sample else 0.0,
        "top_p": icfg.top_p,
        "top_k": icfg.top_k,
        "min_p": 0.0,
        "repeat_penalty": icfg.repetition_penalty,
        "max_tokens": icfg.max_new_tokens,
    }


def with_request_defaults(app, defaults: dict):
    """An ASGI wrapper that fills the fields a completion request leaves out; what a client sends wins."""
    import json

    paths = ("/v1/chat/completions", "/v1/completions")

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in paths:
            return await app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        try:
            req = loads(body)
            if isinstance(req, dict):
                body = json.dumps({**defaults, **{k: v for k, v in req.items() if v is not None}}).encode()
        except ValueError:
            pass  # not JSON: the server's own validation answers it
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await app(scope, replay, send)

    return wrapped


def loopback_only(host: str) -> bool:
    """Whether `host` is an address only this machine reaches ("localhost", 127.0.0.0/8, ::1)."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def serve(
    model: Path,
    lora: Path | None,
    host: str,
    port: int,
    n_ctx: int,
    alias: str,
    defaults: dict,
    api_key: str | None = None,
) -> None:
    """llama-cpp-python's OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) on the
    GGUF; the chat prompt is rendered from the GGUF's own tokenizer.chat_template (chat_format left unset), and
    requests default to the run's inference settings."""
    require("serving a GGUF (--serve)")
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise UserError(
            f"the server needs llama-cpp-python's [server] extra ({e.name} is missing): {INSTALL_HINT}"
        ) from None
    check_port(host, port)
    if not api_key and not loopback_only(host):
        log.warning(
            "serving on %s without an API key: anyone who can reach port %d of this machine can use the model; "
            "pass --api-key KEY (or set FTKIT_API_KEY), or bind --host 127.0.0.1",
            host,
            port,
        )
    if lora is not None:
        check_adapter_fits(model, lora)
    settings = ModelSettings(
        model=str(model),
        model_alias=alias,
        lora_path=str(lora) if lora else None,
        n_ctx=n_ctx,
        n_threads=cpu_threads(),
        verbose=False,
    )
    with refusal_as_user_error(model, lora):
        server = ServerSettings(host=host, port=port, api_key=api_key or None)  # clients send "Bearer KEY"
        app = create_app(server_settings=server, model_settings=[settings])
    log.info(
        "serving %s%s as '%s' on http://%s:%d/v1%s (Ctrl+C stops); request defaults: %s",
        model,
        f" + {lora}" if lora else "",
        alias,
        host,
        port,
        ", API key required" if api_key else "",
        ", ".join(f"{k}={v}" for k, v in defaults.items()),
    )
    uvicorn.run(with_request_defaults(app, defaults), host=host, port=port, log_level="warning")


def teacher_forced(llm, prompt: list[int], answer: list[int]) -> tuple[float, list[int]]:
    """(summed negative log-likelihood of `answer` after `prompt`, llama.cpp's argmax at each answer position).
    The model must be loaded with logits_all=True (greedy_after_teacher_forcing decodes on from here).

    What llm.eval(prompt + answer) does, into the same cache, except that logits are asked for only at the
    positions read here: with logits_all every prompt position also ran the output head (a 49k-token
    vocabulary on SmolLM2) and had its logits copied out, though prompts are most of each row."""
    import numpy as np

    tokens, first = prompt + answer, len(prompt) - 1
    # Rows share their template's preamble (about half of each demo row's tokens, and llama.cpp's time here is
    # in proportion to the tokens it reads): the cache keeps the longest prefix this row shares with what it
    # holds (llm.input_ids[:n_tokens], as llama-cpp-python's own generate reuses it), up to the first position
    # whose logits are read.
    keep = 0
    for have, want in zip(llm.input_ids[: min(llm.n_tokens, first)].tolist(), tokens):
        if have != want:
            break
        keep += 1
    llm._ctx.kv_cache_seq_rm(-1, keep, -1)
    llm.n_tokens = keep
    rows = []
    for start in range(keep, len(tokens), llm.n_batch):
        batch = tokens[start : start + llm.n_batch]
        llm._batch.set_batch(batch=batch, n_past=start, logits_all=False)  # the batch's last token only
        for i in range(len(batch)):
            llm._batch.batch.logits[i] |= start + i >= first
        llm._ctx.decode(llm._batch)
        if start + len(batch) > first:  # the positions read run to the end: every logits row of the batch is one
            n = start + len(batch) - max(start, first)
            rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n, llm.n_vocab())).astype(np.float64))
        llm.input_ids[start : start + len(batch)] = batch
        llm.n_tokens += len(batch)
    llm._requires_eval = False
    logits = np.concatenate(rows)[: len(answer)]
    top = logits.argmax(-1)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(answer)), answer].sum()), [int(t) for t in top]


def greedy_after_teacher_forcing(llm, prompt: list[int], answer: list[int], top: list[int], n: int) -> list[int]:
    """greedy_ids(llm, prompt, n), read from a teacher-forced pass over prompt + answer that left `top` (its argmax
    at each answer position) and its KV cache behind. While greedy decoding reproduces the reference answer, its
    next token is the teacher-forced argmax at that position, so only the tokens after the first disagreement are
    decoded, from the cached prefix: the same answer, without re-reading the prompt or the agreeing tokens."""
    out: list[int] = []
    for want, got in zip(answer, top):
        if len(out) == n or _is_eog(llm, got):
            return out
        out.append(got)
        if got != want:
            break
    if len(out) == n:
        return out
    return out + greedy_ids(llm, prompt + out, n - len(out))


def export_quality(
    files: dict[str, Path], rows: list[dict], template, tok, max_length: int, max_new_tokens: int
) -> dict:
    """Each GGUF run inside llama.cpp on held-out Alpaca rows: perplexity of the reference answers, top-1
    agreement with the first file's (the reference export's) argmax at every answer position, and exact match
    of greedy answers on the verifiable rows, detokenized by llama.cpp. Each row is read once per file: the
    greedy answer continues from the teacher-forced pass (greedy_after_teacher_forcing)."""
    import math

    from .scoring import exact_match, generation_budget, is_verifiable

    pairs = []
    for r in rows:
        ids, labels = template.encode(tok, r["instruction"], r.get("input") or None, r["output"], max_length)[:2]
        k = next(i for i, lab in enumerate(labels) if lab != -100)
        pairs.append((ids[:k], ids[k:]))
    verifiable = {i for i, r in enumerate(rows) if is_verifiable(r)}
    budget = generation_budget(tok, [rows[i] for i in sorted(verifiable)] or rows, max_new_tokens)
    n_ctx = max(len(p) + len(a) for p, a in pairs) + budget + 16
    out: dict[str, dict] = {}
    ref_top: list[list[int]] | None = None
    for name, what in files.items():
        path, lora = what if isinstance(what, tuple) else (what, None)
        llm = load(path, lora=lora, n_ctx=n_ctx, logits_all=True)
        nll, n, tops, answers = 0.0, 0, [[]] * len(pairs), {}
        # In token order, so that each row shares the longest prefix with the one before (teacher_forced keeps it).
        for i in sorted(range(len(pairs)), key=lambda i: pairs[i][0]):
            p, a = pairs[i]
            s, tops[i] = teacher_forced(llm, p, a)
            nll, n = nll + s, n + len(a)
            if i in verifiable:
                ids = greedy_after_teacher_forcing(llm, p, a, tops[i], budget)
                answers[i] = llm.detokenize(ids).decode("utf-8", "replace")
        answers = [answers[i] for i in sorted(verifiable)]
        em = [exact_match(ans, rows[i]["output"]) for ans, i in zip(answers, sorted(verifiable))]
        ref_top = ref_top or tops
        same = sum(x == y for a, b in zip(tops, ref_top) for x, y in zip(a, b))
        out[name] = {
            "file": str(path) + (f" + {lora}" if lora else ""),
            "size_mb": round((path.stat().st_size + (lora.stat().st_size if lora else 0)) / 1e6, 1),
            "perplexity": math.exp(nll / n),
            "top1_agreement": same / n,
            "exact_match": sum(em) / len(em) if em else None,
            "verifiable_rows": len(em),
            "answers": answers,
        }
        llm.close()
    return out
