"""Generate with the fine-tuned model, using exactly the prompt template it was trained with.

Reads:  <run>/config.yaml and <run>/prompt_template.json; <run>/merged/ when present, else the base at
        `model.name_or_path` plus <run>/adapter/ (or force either with --merged / --adapter [DIR];
        --adapter DIR puts another adapter trained on the same base over it, unmerged;
        --base answers with the untouched base model, for comparison).
        --input-file: JSON lines, one prompt a line: {"instruction": ..., "input": ..., "id": ...}
        ("prompt" is accepted for "instruction"; "input" and "id" are optional; other keys are copied through),
        or a conversation {"messages": [...]} (or ShareGPT "conversations"): its last user turn is answered.
Writes: --prompt: the answer to stdout, streamed token by token.
        --input-file: --output-file (default <input>.answers.jsonl): each input row plus "id" (the row's own
        id, else its 0-based index in the file) and "response". Appended and flushed batch by batch, so a
        crash or Ctrl+C loses at most the batch in flight; running again skips the rows already answered (a
        line cut short by a crash is dropped) and, once all are answered, rewrites the file in input order.
        --chat: an interactive REPL on the terminal; /save PATH writes the conversation as one `messages`
        JSON line (a .jsonl file of earlier ones gets it appended), which dataset.py reads as training data.
        --serve [GGUF]: nothing; serves the GGUF (default: the newest full model in <run>/export/, written by
        export_gguf.py), optionally with --lora ADAPTER.gguf over it, through llama-cpp-python's
        OpenAI-compatible server on --host/--port (needs `make llama-cpp`). The chat prompt comes from the
        GGUF's own template, which export_gguf.py wrote from the training template; a request's missing
        sampling fields default to the run's `inference` settings (greedy unless inference.do_sample).

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
    python inference.py --serve --port 8000     # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    FTKIT_API_KEY=... python inference.py --serve --host 0.0.0.0   # clients then pass api_key=that key
"""

from __future__ import annotations

import os
from pathlib import Path

from ftkit.answers import answer_file, read_prompt_file
from ftkit.chat import chat
from ftkit.cli import build_parser, parse_args, run_main
from ftkit.config import Config
from ftkit.errors import UserError
from ftkit.generation import generate, load_for_inference, stream_one
from ftkit.gguf import gguf_type
from ftkit.jsonl import check_text, read_jsonl
from ftkit.llamacpp import sampling_defaults, serve
from ftkit.paths import RunDir, stage_config
from ftkit.scoring import held_out_row, prompt_of

# Where --serve listens unless told: this machine only.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def held_out_rows(run: RunDir, n_max: int) -> list[dict]:
    path = run.eval_rows
    if not path.is_file():
        raise UserError(f"'{path}' is missing; --compare needs a run made by finetune.py")
    lines = read_jsonl(path, "held-out rows", "train again to write it")[:n_max]
    rows = [held_out_row(row, f"{path}: line {n}") for n, row in lines]
    if not rows:
        raise UserError(f"'{path}' holds no held-out rows; set data.eval_size above 0 and train again")
    return rows


def compare(cfg: Config, run: RunDir, n: int, use: str | None = None, adapter: Path | None = None) -> list[dict]:
    """Base model vs fine-tuned model (--merged / --adapter [DIR] pick which) on n held-out rows, side by side."""
    tuned = use or cfg.inference.use
    if tuned == "base":
        raise UserError("--compare sets the base beside the fine-tuned model; drop --base (inference.use=base)")
    rows = held_out_rows(run, n)
    pairs = [prompt_of(r) for r in rows]
    results = {}
    for key, which, extra in (("base", "base", None), ("tuned", tuned, adapter)):
        model, tok, template, _ = load_for_inference(cfg, run, which, extra)
        results[key] = generate(model, tok, template, pairs, cfg.inference)
        del model
    out = []
    for r, b, t in zip(rows, results["base"], results["tuned"]):
        prompt = r["instruction"] + (f"\n  input: {r['input']}" if r.get("input") else "")
        print(f"\n### {prompt}\n  reference : {r['output'][:200]}\n  base      : {b}\n  fine-tuned: {t}")
        out.append(
            {
                "instruction": r["instruction"],
                "input": r.get("input", ""),
                "reference": r["output"],
                "base": b,
                "fine_tuned": t,
            }
        )
    return out


def main(
    cfg: Config,
    run: RunDir,
    prompt: str,
    input_text: str | None = None,
    use: str | None = None,
    adapter: Path | None = None,
) -> str:
    """Answer one prompt, streamed to stdout (see the module docstring for what is read)."""
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt")
    model, tok, template, _ = load_for_inference(cfg, run, use or cfg.inference.use, adapter)
    return stream_one(model, tok, template, prompt, input_text, cfg.inference)


def newest_export(run: RunDir) -> Path:
    """The most recently written full-model GGUF of the run (adapters, named *-LoRA.gguf, are not models)."""
    found = [f for f in run.export.glob("*.gguf") if not f.stem.endswith("-LoRA")] if run.export.is_dir() else []
    if not found:
        raise UserError(f"no GGUF in '{run.export}'; export one first (python export_gguf.py) or pass --serve FILE")
    return max(found, key=lambda f: f.stat().st_mtime)


def check_gguf_file(path: Path, flag: str, kind: str) -> Path:
    """A GGUF of the expected general.type: a model for --serve, a LoRA adapter for --lora."""
    path = path.expanduser()
    if not path.is_file():
        raise UserError(f"{flag} '{path}' is not a file; pass a .gguf written by export_gguf.py")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{flag} '{path}' is not a GGUF file; pass a .gguf written by export_gguf.py")
    got, _ = gguf_type(path)
    if got != kind:
        fix = "pass it with --lora over its base model's GGUF" if got == "adapter" else "pass it with --serve"
        raise UserError(f"{flag} '{path}' is a GGUF {got}, not {'an' if kind[0] in 'aeiou' else 'a'} {kind}; {fix}")
    return path


def serve_gguf(
    cfg: Config, run: RunDir | None, gguf: Path | None, lora: Path | None, host: str, port: int, api_key: str | None
) -> None:
    """The OpenAI-compatible server on the run's export (or the given GGUF), until Ctrl+C."""
    if gguf is None:
        if run is None:
            raise UserError("--serve without a file serves the most recent run's export; no run found: pass a GGUF")
        gguf = newest_export(run)
    gguf = check_gguf_file(gguf, "--serve", "model")
    lora = check_gguf_file(lora, "--lora", "adapter") if lora is not None else None
    # room for the longest training row plus an answer; llama.cpp allocates the KV cache for all of it
    n_ctx = max(2048, -(-(cfg.data.max_length + cfg.inference.max_new_tokens) // 256) * 256)
    alias = run.root.name if run is not None else gguf.stem
    serve(gguf, lora, host, port, n_ctx, alias, sampling_defaults(cfg.inference), api_key)


def cli(argv) -> None:
    a = parse_args(build_cli_parser(), argv)
    adapter = adapter_dir(a)
    check_flags(a)
    if a.serve is not None:
        serve_cli(a)
        return
    cfg, run = stage_config(a.config, a.overrides)
    if a.compare:
        compare(cfg, run, a.compare, a.use, adapter)
    elif a.input_file is not None:
        answer_file(cfg, run, a.input_file, a.output_file, a.use, adapter)
    elif a.chat:
        chat(cfg, run, a.use, adapter)
    elif a.prompt is None:
        raise UserError("nothing to do; pass --prompt TEXT, --input-file JSONL, --chat or --compare N")
    else:
        main(cfg, run, a.prompt, a.input, a.use, adapter)


def build_cli_parser():
    p = build_parser(__doc__)
    p.add_argument("--prompt", help="the instruction")
    p.add_argument(
        "--compare",
        type=int,
        metavar="N",
        help="answer N held-out rows with the base and the fine-tuned model, side by side",
    )
    p.add_argument("--input", default=None, help="Alpaca's optional input field")
    p.add_argument("--input-file", type=Path, metavar="JSONL", help="answer every prompt in this JSON-lines file")
    p.add_argument(
        "--output-file",
        type=Path,
        metavar="JSONL",
        help="where --input-file's answers go (default <input>.answers.jsonl); resumed if it exists",
    )
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat in the terminal")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merged", dest="use", action="store_const", const="merged", help="use <run>/merged")
    g.add_argument(
        "--adapter",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="base + <run>/adapter, unmerged; or base + the adapter in DIR (trained on the same base)",
    )
    g.add_argument("--base", dest="use", action="store_const", const="base", help="the base model alone")
    p.add_argument(
        "--serve",
        nargs="?",
        const=True,
        default=None,
        metavar="GGUF",
        help="serve a GGUF (default: the run's newest export) through an OpenAI-compatible server",
    )
    p.add_argument("--lora", type=Path, metavar="GGUF", help="with --serve: a LoRA adapter GGUF applied over it")
    # No defaults here: "given" is then one test for `--port 9000` and `--port=9000` (check_flags).
    p.add_argument("--host", help=f"with --serve: the address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, help=f"with --serve: the TCP port (default {DEFAULT_PORT})")
    p.add_argument(
        "--api-key",
        help="with --serve: requests must send 'Authorization: Bearer KEY' (default: $FTKIT_API_KEY, which keeps "
        "the key out of the process list); without one, binding beyond 127.0.0.1 warns",
    )
    return p


def adapter_dir(a) -> Path | None:
    """--adapter [DIR]: the run's adapter (None), or the one in DIR; `--adapter key=value` is an override."""
    adapter = None
    if a.adapter is not None:
        a.use = "adapter"
        if isinstance(a.adapter, str):
            if "=" in a.adapter and not Path(a.adapter).is_dir():
                a.overrides.insert(0, a.adapter)  # `--adapter section.key=value`: an override, not a folder
            else:
                adapter = Path(a.adapter).expanduser()
    return adapter


def check_flags(a) -> None:
    """One mode at a time, and each flag with the mode it belongs to: refused before any model is looked at."""
    modes = [
        m
        for m, on in (
            ("--prompt", a.prompt is not None),
            ("--compare", bool(a.compare)),
            ("--input-file", a.input_file is not None),
            ("--chat", a.chat),
            ("--serve", a.serve is not None),
        )
        if on
    ]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} do different things; pass one of them")
    if a.serve is None and (a.lora is not None or a.port is not None or a.host is not None or a.api_key is not None):
        raise UserError("--lora, --host, --port and --api-key go with --serve; add --serve")
    if a.serve is not None and (a.use is not None or a.adapter is not None):
        raise UserError(
            "--serve serves a GGUF, not the HF weights --merged/--adapter/--base pick; for an adapter pass "
            "--lora ADAPTER.gguf (python export_gguf.py --adapter writes one)"
        )
    if a.compare is not None and a.compare < 1:
        raise UserError(f"--compare {a.compare}: pass how many held-out rows to compare, 1 or more")
    if a.output_file is not None and a.input_file is None:
        raise UserError("--output-file needs --input-file (the prompts to answer)")
    if a.prompt is not None and not a.prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt")
    for flag, text in (("--prompt", a.prompt), ("--input", a.input)):
        check_text(text, flag, "pass UTF-8 text (check the terminal's or the script's encoding)")
    if a.input_file is not None:
        read_prompt_file(a.input_file)  # a bad line fails before any run or model is looked at


def serve_cli(a) -> None:
    """--serve: check llama.cpp and the port, then serve the given GGUF or the run's newest export."""
    from ftkit.llamacpp import check_port, require

    require("serving a GGUF (--serve)")
    host = DEFAULT_HOST if a.host is None else a.host
    port = DEFAULT_PORT if a.port is None else a.port
    check_port(host, port)
    gguf = None if a.serve is True else Path(a.serve)
    if gguf is not None and "=" in a.serve and not gguf.exists():
        a.overrides.insert(0, a.serve)  # `--serve section.key=value`: an override, not a file
        gguf = None
    if gguf is not None and a.config is None:
        from ftkit.config import load_config

        cfg, run = load_config(None, a.overrides), None  # a GGUF of its own needs no run
    else:
        cfg, run = stage_config(a.config, a.overrides)
    serve_gguf(cfg, run, gguf, a.lora, host, port, a.api_key or os.environ.get("FTKIT_API_KEY"))


if __name__ == "__main__":
    run_main(cli)
