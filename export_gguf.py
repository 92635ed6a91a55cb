"""Export the merged model as one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile beside it.

Pure Python through the maintained `gguf` package (GGUFWriter, gguf.quants): no llama.cpp build step.

Reads:  the most recent run's <run>/merged/ (config.json, *.safetensors, tokenizer files), <run>/config.yaml and
        <run>/prompt_template.json (the template used in training) -- or, with --config, that config's run;
        or any HF Llama checkpoint folder with --model DIR (its own chat template, else Alpaca, is used).
Writes: --outfile, default <run>/export/model-<type>.gguf: the weights (`--type` f16, bf16, f32 or q8_0), the
        tokenizer (byte-level BPE: tokens, types, merges, bos/eos/pad ids) and a chat template that renders
        the training prompt; and <outfile dir>/Modelfile for `ollama create`, with the training prompt as an
        Ollama TEMPLATE, its stop tokens and the run's sampling settings. Both are written to a temporary
        file and renamed, so a failure leaves neither half-written; all input is checked before writing.

Run:
    python export_gguf.py                            # most recent run, f16
    python export_gguf.py --type q8_0                # 8-bit, about half the size
    python export_gguf.py --model DIR --outfile out/model-q8_0.gguf --type q8_0
    ollama create my-model -f runs/<run>/export/Modelfile && ollama run my-model
    llama-cli -m runs/<run>/export/model-f16.gguf -cnv   # llama.cpp picks up the chat template

Supported: the Llama architecture (`model_type: llama`: Llama 2/3, SmolLM2, TinyLlama, ...) with a
byte-level BPE tokenizer (Llama 3, SmolLM2, GPT-2 style). Llama-3.1 "llama3" and linear RoPE scaling are
written the way llama.cpp reads them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ftkit.cli import UserError, build_parser, log, parse_args, run_main, user_errors
from ftkit.config import Config
from ftkit.gguf import (
    MODELFILE_HEADER,
    TYPES,
    modelfile_text,
    plan_tensors,
    read_checkpoint,
    read_vocab,
    rope_params,
    write_gguf,
)
from ftkit.paths import RunDir, atomic_write_text, check_free_space, stage_config
from ftkit.prompts import PromptTemplate
from ftkit.runlock import RunLock, check_unlocked, clean_tmp_leftovers


def load_template(run: RunDir | None, tok) -> PromptTemplate:
    if run is not None and run.prompt_template.is_file():
        return PromptTemplate.load(run.prompt_template)
    kind = "chat" if getattr(tok, "chat_template", None) else "alpaca"
    log.info(
        "no prompt_template.json from training; using the tokenizer's %s template",
        "chat" if kind == "chat" else "(none: Alpaca)",
    )
    return PromptTemplate.from_config(kind, tok)


def check_own_outputs(outfile: Path) -> None:
    """A file already at --outfile, or a Modelfile beside it, is replaced only when export_gguf.py wrote it (a
    GGUF; a Modelfile with our header): anything else is the user's and stays byte for byte."""
    if outfile.is_file():
        with open(outfile, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UserError(
                f"--outfile '{outfile}' exists and is not a GGUF file; it is left untouched: choose another --outfile"
            )
    mf = outfile.parent / "Modelfile"
    if mf.is_dir() or (mf.is_file() and not mf.read_bytes().startswith(MODELFILE_HEADER.encode())):
        raise UserError(
            f"'{mf}' exists and was not written by export_gguf.py; it is left untouched: move it or "
            "choose an --outfile in another folder"
        )


def main(
    cfg: Config, run: RunDir | None, qtype: str = "f16", outfile: Path | None = None, model_dir: Path | None = None
) -> Path:
    """Export <run>/merged (or model_dir) to `outfile` as GGUF of type `qtype`, plus a Modelfile beside it."""
    import logging

    from transformers import AutoTokenizer

    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs every step at INFO
    if qtype not in TYPES:
        raise UserError(f"--type {qtype} is not supported; choose one of {', '.join(TYPES)}")
    src = model_dir or (run.merged if run else None)
    if src is None:
        raise UserError("nothing to export; pass --config for a run or --model DIR")
    if model_dir is None and not src.exists():
        raise UserError(f"no merged model in '{src}'; run merge_adapter.py first (or pass --model DIR)")
    ckpt = read_checkpoint(src)
    rp = rope_params(ckpt.config)
    if rp["rope_type"] not in ("default", "llama3", "linear"):
        raise UserError(
            f"RoPE scaling '{rp['rope_type']}' is not supported by export_gguf.py (default, linear "
            "and llama3 are); use llama.cpp's convert_hf_to_gguf.py"
        )
    with user_errors(f"cannot load the tokenizer in '{src}'", "re-run merge_adapter.py (it saves the tokenizer)"):
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    template = load_template(run if model_dir is None else None, tok)
    plans = plan_tensors(ckpt, qtype)
    vocab = read_vocab(tok, template, ckpt.config.vocab_size)
    if outfile is None:
        if run is None or model_dir is not None:
            raise UserError("--model needs --outfile PATH (where the .gguf goes)")
        outfile = run.export / f"model-{qtype}.gguf"
    if outfile.suffix != ".gguf":
        raise UserError(f"--outfile '{outfile}' should end in .gguf")
    if outfile.is_dir():
        raise UserError(f"--outfile '{outfile}' is a folder; give a file path ending in .gguf")
    check_own_outputs(outfile)
    if run is not None:
        check_unlocked(run.root)
    clean_tmp_leftovers(outfile.parent, names=(outfile.name, "Modelfile"))
    outfile.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.nbytes for p in plans)
    check_free_space(outfile.parent, int(total * 1.05) + (64 << 20), f"the {qtype} GGUF")
    name = (run.root.name if run is not None and model_dir is None else src.name) or "model"
    modelfile = modelfile_text(
        outfile.name, tok, template, cfg.inference, vocab.add_bos, str(src)
    )  # built before writing: a template problem leaves nothing behind
    log.info(
        "exporting %s -> %s (%s, %.2f GB, %d tensors, tokenizer pre '%s')",
        src,
        outfile,
        qtype,
        total / 1e9,
        len(plans),
        vocab.pre,
    )
    inside_run = run is not None and outfile.resolve().is_relative_to(run.root.resolve())
    with RunLock(run.root, "export_gguf.py") if inside_run else contextlib.nullcontext():
        write_gguf(ckpt, plans, vocab, qtype, name, outfile)
        atomic_write_text(outfile.parent / "Modelfile", modelfile)
    log.info("wrote %s and %s", outfile, outfile.parent / "Modelfile")
    return outfile


def cli(argv) -> None:
    p = build_parser(__doc__)
    p.add_argument("--outfile", type=Path, help="the .gguf to write (default <run>/export/model-<type>.gguf)")
    p.add_argument("--type", default="f16", choices=list(TYPES), help="weight format (default f16)")
    p.add_argument("--model", type=Path, help="export this HF Llama checkpoint folder instead of <run>/merged")
    a = parse_args(p, argv)
    if a.model is not None and a.config is None:
        from ftkit.config import load_config

        cfg, run = load_config(None, a.overrides), None
    else:
        cfg, run = stage_config(a.config, a.overrides)
    main(cfg, run, a.type, a.outfile, a.model)


if __name__ == "__main__":
    run_main(cli)
