"""What tests share besides fixtures: the repo path, the tiny random Llama builders, a tiny Alpaca table, the
overrides that make the demo config a seconds-long run, running a stage script as a user does, and a renderer
of the Go templates that Ollama Modelfiles hold."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_tiny_llama(out: Path, tokenizer_from: Path, seed: int, tied: bool, bf16: bool) -> Path:
    """A 2-layer random Llama saved with the SmolLM2 tokenizer (so chat templates work)."""
    from transformers import AutoTokenizer

    return save_random_llama(
        out,
        AutoTokenizer.from_pretrained(tokenizer_from),
        seed,
        tied,
        bf16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
    )


def save_random_llama(out: Path, tok, seed: int, tied: bool, bf16: bool, **sizes) -> Path:
    """A random Llama of the given sizes (4 heads, 2 KV heads) for `tok`, saved with it in `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokens = tokens_of(tok, tied)
    # Built without a pad id, which is set afterwards: transformers' initialiser zeroes the padding_idx row of the
    # embedding, and where the pad token is one the text uses (SmolLM2's pad is its <|im_end|>, as converted from
    # its GGUF since transformers 5.24) a zero row, tied to the head, pins that token's logit at 0: the model could
    # never learn to end a turn. A released model's row is a trained one; here it is drawn like every other row.
    cfg = LlamaConfig(
        vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=2, **(tokens | {"pad_token_id": None}), **sizes
    )
    model = LlamaForCausalLM(cfg)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokens["pad_token_id"]
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tokens_of(tok, tied: bool) -> dict:
    """A model config's token ids and head tying, for `tok`."""
    return dict(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tied,
    )


# Per-architecture settings a tiny model needs beyond the shared sizes: the transformers defaults are the real
# models' (Gemma's head_dim 256, a 4096-token sliding window), which would make "tiny" neither tiny nor exercised.
TINY_ARCH = {
    "llama": {},
    "qwen2": {"use_sliding_window": False},
    "mistral": {"sliding_window": None},
    # heads wider than hidden_size / heads, as Qwen3 and Gemma ship (attention.key_length must then be written)
    "qwen3": {"use_sliding_window": False, "head_dim": 32},
    "phi3": {"sliding_window": None},
    # a window shorter than the test prompts, so that llama.cpp's sliding-window layers are really compared
    "gemma2": {"sliding_window": 4, "query_pre_attn_scalar": 32, "head_dim": 32},
    # six layers: llama.cpp's Gemma 3 layout has one global layer in six; the global layers' RoPE scaled linearly by
    # 8, as Gemma 3 4B/12B/27B ship (the sliding layers keep theta 10000, unscaled)
    "gemma3_text": {
        "sliding_window": 4,
        "query_pre_attn_scalar": 16,
        "num_hidden_layers": 6,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
}


def build_tiny_model(out: Path, model_type: str, tok, seed: int = 0, tied: bool = False, vocab_size: int = 0) -> Path:
    """A 2-layer model of `model_type` from transformers' own config class (hidden 64, 4 heads of 16, 2 KV heads,
    MLP 128; TINY_ARCH may change that) for `tok`, saved with it in `out` in float32; `vocab_size`: embedding
    rows, when more than the tokenizer's (padding, as released models have, and room for the tokens transformers'
    own tokenizer class for the model type adds, e.g. Qwen2's <|endoftext|>). The weights are drawn here from one
    seeded generator in name order, not by transformers' initialisers, so the same seed gives the same bytes across
    versions."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    cfg = AutoConfig.for_model(
        model_type, vocab_size=vocab_size or len(tok), **tokens_of(tok, tied), **(sizes | TINY_ARCH[model_type])
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            # unit-scale activations (weights ~ 1/sqrt(fan-in)): logits far enough apart that the top token
            # of a random model is not a near-tie that any rounding flips
            noise = torch.randn(p.shape, generator=g)
            # norms: around the model's own constant start, 1 for a weight, 0 for Gemma's offset (scale 1 + w)
            p.copy_(noise / p.shape[1] ** 0.5 if p.dim() == 2 else p + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_offline_llama(out: Path, seed: int = 0, tied: bool = False) -> Path:
    """A small random Llama (hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 512, bf16) with offline_tokenizer():
    no download, no SmolLM2 package, so it can be built on a bare GPU machine."""
    return save_random_llama(
        out,
        offline_tokenizer(),
        seed,
        tied,
        bf16=True,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        max_position_embeddings=2048,
    )


def offline_tokenizer(pre_tokenizer=None):
    """A 512-token byte-level BPE tokenizer trained in-process on the Alpaca prompt text, with BOS/EOS/pad tokens and
    no chat template (train with data.prompt_template=alpaca); every byte is in its alphabet, so any text
    tokenizes. Small: a GGUF reader parses its vocabulary in milliseconds, SmolLM2's 49k in seconds.
    `pre_tokenizer`: another split before BPE (the default: GPT-2's byte-level regex)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ftkit.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    bos, eos, pad = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT] * 20 + [" ".join(r.values()) for r in ALPACA_ROWS] * 5
    core.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=[bos, eos, pad],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    # The Alpaca prompt relies on the tokenizer to add BOS (add_special_tokens=True), as Llama's does.
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=2048
    )


ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Give a synonym for happy.", "input": "", "output": "Joyful"},
    {"instruction": "Uppercase the word.", "input": "cat", "output": "CAT"},
    {"instruction": "What color is the sky on a clear day?", "input": "", "output": "Blue"},
    {"instruction": "Count the letters.", "input": "hello", "output": "5"},
    {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
]


def tiny_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    """Overrides that turn configs/demo.yaml into a seconds-long run on the tiny model."""
    o = {
        "model.name_or_path": str(model),
        "model.gguf_source": "null",
        "data.path": str(data),
        "data.eval_size": 4,
        "data.max_length": 128,
        "train.max_steps": 4,
        "train.save_steps": 2,
        "train.eval_steps": 2,
        "train.logging_steps": 1,
        "train.per_device_train_batch_size": 4,
        "train.learning_rate": 1e-3,
        "paths.output_dir": str(out),
        "paths.latest": str(out.parent / "latest"),
        "inference.max_new_tokens": 8,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


# Environment variables that libraries read once, at import (huggingface_hub's cache and offline switch), or
# that only a new interpreter honours (PYTHONPATH): a stage that needs one of them set differently from this
# test process runs as its own process.
PROCESS_ONLY_ENV = ("PYTHONPATH", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_CACHE")


def copy_run(src: Path, dest: Path) -> Path:
    """A copy of a finished run whose config.yaml names the copy: for a test that changes a shared run."""
    import shutil

    shutil.copytree(src, dest)
    (dest / "config.yaml").write_text((dest / "config.yaml").read_text().replace(str(src), str(dest)))
    return dest


def run_script(
    script: str,
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    unset: tuple = (),
    timeout: int = 600,
    process: bool = False,
) -> subprocess.CompletedProcess:
    """Run a stage as a user does (argv in; exit code, stdout and stderr out). In this test process by default
    (the ~6 s of imports a new interpreter pays are paid once per test run); as a real process with
    `process=True`, or when the environment asks for something only a new process honours."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {}))
    for k in unset:
        e.pop(k, None)
    if process or any(e.get(k) != os.environ.get(k) for k in PROCESS_ONLY_ENV):
        return subprocess.run(
            [sys.executable, str(REPO / script), *args],
            cwd=cwd or REPO,
            env=e,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return run_in_process(script, list(args), cwd=cwd or REPO, env=e)


def run_in_process(script: str, args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Execute `script` as __main__ with `args`, as its own process would, and give back what that process
    would have: the exit code, stdout, stderr. What a process start or exit would reset is saved and put back:
    the environment, the working folder, argv, the standard streams, the root logger, the signal handlers,
    warning filters, and any exit hook the project registers, which runs at the end as at exit."""
    import atexit
    import io
    import logging
    import runpy
    import signal
    import traceback
    import warnings

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_streams = (sys.stdout, sys.stderr)
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level, root.filters[:])
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stream_handlers = _library_stream_handlers()
    register, exit_hooks = atexit.register, []

    def register_own(fn, *a, **kw):
        # The project's exit hooks run when this "process" ends; any library's stay with the real exit.
        if (getattr(fn, "__module__", None) or "").startswith("ftkit"):
            exit_hooks.append((fn, a, kw))
            return fn
        return register(fn, *a, **kw)

    code = 0
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [str(REPO / script), *args]
    sys.stdout, sys.stderr = out, err
    for h in stream_handlers:
        h.setStream(err)
    atexit.register = register_own
    try:
        with warnings.catch_warnings():
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the interpreter does with an uncaught exception
                traceback.print_exc(file=sys.stderr)
                code = 1
            for fn, a, kw in reversed(exit_hooks):
                try:
                    fn(*a, **kw)
                except Exception:
                    traceback.print_exc(file=sys.stderr)
    finally:
        atexit.register = register
        sys.stdout, sys.stderr = saved_streams
        for h in _library_stream_handlers(err):
            h.setStream(saved_streams[1])
        for h in stream_handlers:
            h.setStream(saved_streams[1])
        root.handlers[:], root.filters[:] = saved_root[0], saved_root[2]
        root.setLevel(saved_root[1])
        for s, h in saved_signals.items():
            signal.signal(s, h)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def _library_stream_handlers(stream=None) -> list:
    """The libraries' own console handlers (transformers makes one on first use): they write to the stream that
    was sys.stderr when they were made, so they follow the captured stream while a stage runs in-process."""
    import logging

    found = []
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for h in getattr(logger, "handlers", ()):
            if type(h) is logging.StreamHandler:
                s = getattr(h.stream, "_stream", h.stream)  # ftkit.cli.RedactStream wraps the stream
                if (stream is None and s in (sys.stderr, sys.__stderr__)) or (stream is not None and s is stream):
                    found.append(h)
    return found


# -- Ollama's Go templates -----------------------------------------------------------------------------------
GO_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def go_render(tpl: str, data: dict) -> str:
    """The subset of Go's text/template the Modelfiles use: {{ .X }}, {{ $.X }}, {{ $var }}, {{ "lit" }}, {{ 1 }},
    if/else/else if/end, range .Messages and range $i, $m := .Messages, the functions eq/ne/le/lt on two arguments,
    and/or (Go's: the first empty argument, or the last), (parenthesised) calls as arguments, and {{- / -}}
    whitespace trimming (Ollama renders with Go's engine). Any other action is an error rather than a guess."""
    tokens, pos, trim_next = [], 0, False
    for m in GO_ACTION.finditer(tpl):
        text = tpl[pos : m.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        tokens += [("text", text.rstrip(" \t\r\n") if m.group(1) else text), ("act", m.group(2))]
        pos, trim_next = m.end(), bool(m.group(3))
    tail = tpl[pos:]
    tokens.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))

    def parse(i):
        nodes = []
        while i < len(tokens):
            kind, val = tokens[i]
            i += 1
            if kind == "text":
                nodes.append(("text", val))
            elif val in ("end", "else") or val.startswith("else if "):
                return nodes, i, val
            elif val.startswith(("if ", "range ")):
                node, i = block(val, i)
                nodes.append(node)
            else:
                nodes.append(("expr", val))
        return nodes, i, None

    def block(head, i):
        body, i, how = parse(i)
        other = []
        if how == "else":
            other, i, how = parse(i)
        elif how and how.startswith("else if "):  # Go's {{ else if B }}: {{ else }}{{ if B }}, sharing one {{ end }}
            inner, i = block(how[len("else ") :], i)
            other = [inner]
        return (head.split()[0], head.split(" ", 1)[1], body, other), i

    def value(expr, dot, env):
        args = re.findall(r'"[^"]*"|\([^()]*\)|[^\s()]+', expr)
        vals = lambda: [value(a, dot, env) for a in args[1:]]  # noqa: E731
        if args[0] in ("eq", "ne", "le", "lt") and len(args) == 3:
            a, b = vals()
            return {"eq": a == b, "ne": a != b, "le": a <= b, "lt": a < b}[args[0]]
        if args[0] in ("and", "or") and len(args) >= 3:
            out = None
            for v in vals():
                out = v
                if bool(v) != (args[0] == "and"):
                    break
            return out
        if len(args) == 1 and (args[0].startswith('"') or args[0].isdigit()):
            return json.loads(args[0])
        if len(args) == 1 and args[0].startswith("("):
            return value(args[0][1:-1], dot, env)
        if len(args) == 1 and re.fullmatch(r"\$?\.[A-Za-z]+", args[0]):
            src = env["$"] if args[0].startswith("$") else dot
            return src[args[0].split(".", 1)[1]]  # a field the data lacks is an error, not an empty string
        if len(args) == 1 and args[0] in env:
            return env[args[0]]
        raise ValueError(f"Go template syntax this renderer does not know: {{{{ {expr} }}}}")

    def loop(head, body, dot, env):
        names, _, over = head.rpartition(":=")
        names = [n.strip() for n in names.split(",") if n.strip()]
        out = ""
        for i, item in enumerate(value(over.strip(), dot, env)):
            bound = dict(zip(names, [i, item] if len(names) == 2 else [item]))
            out += run(body, item, env | bound)
        return out

    def run(nodes, dot, env):
        out = ""
        for n in nodes:
            if n[0] == "text":
                out += n[1]
            elif n[0] == "expr":
                out += str(value(n[1], dot, env))
            elif n[0] == "if":
                out += run(n[2] if value(n[1], dot, env) else n[3], dot, env)
            else:
                out += loop(n[1], n[2], dot, env)
        return out

    return run(parse(0)[0], data, {"$": data})


def parse_modelfile(text: str) -> dict:
    m = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    s = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = [json.loads(x) for x in re.findall(r"^PARAMETER stop (.*)$", text, re.M)]
    return {
        "template": m.group(1),
        "system": s.group(1) if s else "",
        "stops": stops,
        "from": re.search(r"^FROM (.*)$", text, re.M).group(1),
    }


# Strings whose tokenization a SentencePiece export must keep: runs of spaces, newlines, accents, and characters
# outside the tiny vocabulary (emoji, CJK) that only byte fallback can spell.
SPM_TEXTS = [
    "Sort the numbers: 3, 1, 2.",
    "  two leading spaces,  a double one and a trailing one ",
    "line one\nline two\n\n\tindented",
    "naïve café 3.14",
    "emoji 😀 and 🦙, then 日本語",
]


def sentencepiece_tokenizer(folder: Path, style: str):
    """A ~420-piece SentencePiece BPE (byte fallback, digits split, whitespace kept as is) trained in-process on the
    Alpaca prompt text, loaded through transformers' own class for `style`: 'llama' (Llama 2 / Mistral / Phi-3:
    <unk> <s> </s>, a dummy space prefix) or 'gemma' (<pad> <eos> <bos> <unk>, no prefix, turn markers as user
    symbols). 256 of its pieces are the <0xNN> bytes, the floor for byte fallback."""
    import io

    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    from ftkit.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    corpus = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT] * 20 + [" ".join(r.values()) for r in ALPACA_ROWS] * 5
    ids = (
        dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
        if style == "llama"
        else dict(
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            add_dummy_prefix=False,
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        )
    )
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        **ids,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    # BOS first, as Llama 2, Mistral and Gemma tokenize (the bare tokenizer.model says nothing about it)
    return (LlamaTokenizer if style == "llama" else GemmaTokenizer).from_pretrained(folder, add_bos_token=True)


# ChatML with tools as Qwen2.5 writes them: definitions in a system block, calls as <tool_call> JSON in the
# assistant's turn, outputs as a user turn in <tool_response>.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}{% if m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}"
    "<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(*args: str):
    """`inference.py` with `args` (--serve among them) on a free port: yields (the official `openai` client on it,
    its model list) once it answers, and stops it with Ctrl-C (the way a user does) afterwards."""
    from openai import OpenAI

    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "inference.py"), *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.time() + 180
        while True:
            try:
                models = client.models.list()
                break
            except Exception:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.time() < deadline, "the server did not come up in 180 s"
                time.sleep(1)
        yield client, models
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
