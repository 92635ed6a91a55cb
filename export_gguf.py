"""Export the merged model as one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile beside it, or
the LoRA adapter alone as a llama.cpp adapter GGUF.

f32, f16, bf16, q8_0, q5_1, q5_0, q4_0 in pure Python through the maintained `gguf` package (no build step);
q4_0 and q5_0 are rounded with GPTQ on 256 of the run's training rows (ftkit.gptq; still plain q4_0/q5_0 files);
K-quants (q4_k_m, q5_k_m, q6_k, ...) through llama.cpp's own quantizer, which needs `make llama-cpp`.

Reads:  the most recent run's <run>/merged/ (config.json, *.safetensors, tokenizer files), <run>/config.yaml and
        <run>/prompt_template.json (the template used in training) -- or, with --config, that config's run;
        or any HF checkpoint folder of a supported architecture with --model DIR (its own chat template, else
        Alpaca, is used).
        With --adapter: <run>/adapter/ instead of merged/.
Writes: --outfile, default <run>/export/<BaseName>-<Size>-<FineTune>-<TYPE>.gguf (llama.cpp's naming, e.g.
        SmolLM2-135M-Instruct-demo-Q4_K_M.gguf; general.name/basename/size_label/finetune/base_model set to
        match): the weights, the tokenizer (byte-level BPE: tokens, types, merges; SentencePiece: tokens, scores,
        types, space prefix; bos/eos/pad ids) and a chat template that renders the training prompt; and
        <outfile dir>/Modelfile for `ollama create`, with the training prompt as an Ollama TEMPLATE,
        its stop tokens and the run's sampling settings.
        With --adapter: <run>/export/<...>-<TYPE>-LoRA.gguf only (tens of MB; apply it over the base's GGUF).
        With --base: the run's base model (model.name_or_path) at --type with the run's chat template, as
        <run>/export/base/<BaseName>-<Size>-<TYPE>.gguf, and a Modelfile there that applies the adapter GGUF.
        At 4 bits this keeps the fine-tune better than quantizing the merged model: the LoRA delta stays in
        float instead of being rounded with the weights (README, "GGUF": measured).
        Everything is written to a temporary file and renamed, so a failure or Ctrl+C leaves nothing
        half-written; all input is checked before writing.

Run:
    python export_gguf.py                            # most recent run, f16
    python export_gguf.py --type q8_0                # 8-bit, about half the size
    python export_gguf.py --type q4_k_m              # llama.cpp's Q4_K_M (after `make llama-cpp`)
    python export_gguf.py --adapter                  # the LoRA adapter as a llama.cpp adapter GGUF
    python export_gguf.py --base --type q4_k_m       # then the base at Q4_K_M + Modelfile with ADAPTER
    python export_gguf.py --model DIR --outfile out/model-q8_0.gguf --type q8_0
    ollama create my-model -f runs/<run>/export/Modelfile && ollama run my-model
    llama-cli -m runs/<run>/export/<...>-F16.gguf -cnv   # llama.cpp picks up the chat template
    llama-cli -m base-F16.gguf --lora runs/<run>/export/<...>-F16-LoRA.gguf -cnv
    python inference.py --serve                      # OpenAI-compatible server on the newest export

Supported (ftkit/gguf_arch.py, by config.model_type): llama (Llama 2/3, SmolLM2, TinyLlama), mistral, qwen2,
qwen3, phi3, gemma2 and gemma3_text, with a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM2, GPT-2 style) or a
SentencePiece one with byte fallback (Llama 2, Mistral, Phi-3-mini, Gemma). Names
and keys come from the gguf package's tables; the transforms llama.cpp's converter applies (Llama-family rotary row
order, Gemma's norms as w + 1) are applied here. Llama-3.1 "llama3" and linear RoPE scaling are written the way
llama.cpp reads them. Any other architecture is refused in one line, before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

from ftkit.cli import build_parser, log, parse_args, run_main
from ftkit.config import Config
from ftkit.data import encode_rows, load_clean_split, source_name
from ftkit.errors import UserError, user_errors
from ftkit.gguf import (
    ADAPTER_TYPES,
    MODELFILE_HEADER,
    TYPES,
    check_quantized,
    export_names,
    modelfile_text,
    parse_type,
    plan_adapter,
    plan_tensors,
    read_checkpoint,
    read_vocab,
    rope_params,
    source_type,
    tmp_path_for,
    write_adapter_gguf,
    write_gguf,
    written_by_us,
)
from ftkit.gguf_arch import arch_of
from ftkit.gptq import LEVELS, CalibratedRounding
from ftkit.llamacpp import quantize, require
from ftkit.models import causal_lm_config, read_adapter_config, resolve_model
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


def check_own_outputs(outfile: Path, modelfile: bool = True) -> None:
    """A file already at --outfile, or a Modelfile beside it, is replaced only when export_gguf.py wrote it (a
    GGUF with our writer key; a Modelfile with our header): anything else is the user's and stays byte for byte."""
    if outfile.is_symlink() or (outfile.exists() and not written_by_us(outfile)):
        what = "is a symlink"
        if not outfile.is_symlink():
            with open(outfile, "rb") as f:
                is_gguf = f.read(4) == b"GGUF"
            what = (
                "is a GGUF file export_gguf.py did not write (a downloaded model?)" if is_gguf else "is not a GGUF file"
            )
        raise UserError(f"--outfile '{outfile}' exists and {what}; it is left untouched: choose another --outfile")
    mf = outfile.parent / "Modelfile"
    if modelfile and (mf.is_dir() or (mf.is_file() and not mf.read_bytes().startswith(MODELFILE_HEADER.encode()))):
        raise UserError(
            f"'{mf}' exists and was not written by export_gguf.py; it is left untouched: move it or "
            "choose an --outfile in another folder"
        )


def check_outfile(outfile: Path) -> None:
    if outfile.suffix != ".gguf":
        raise UserError(f"--outfile '{outfile}' should end in .gguf")
    if outfile.is_dir():
        raise UserError(f"--outfile '{outfile}' is a folder; give a file path ending in .gguf")


def claim_outfile(outfile: Path, run: RunDir | None, need: int, what: str, modelfile: bool = True):
    """Every check on --outfile before a byte is written (the folder is made by the caller once its own checks
    passed too); returns the run's lock when the file goes inside the run, so no other stage writes there."""
    check_outfile(outfile)
    check_own_outputs(outfile, modelfile)
    inside_run = run is not None and outfile.resolve().is_relative_to(run.root.resolve())
    if run is not None:
        check_unlocked(run.root, writing=inside_run)
    check_free_space(outfile.parent, need, what, "--outfile")
    clean_tmp_leftovers(outfile.parent, names=(outfile.name, f"{outfile.name}.src") + (("Modelfile",) * modelfile))
    return RunLock(run.root, "export_gguf.py") if inside_run else contextlib.nullcontext()


def write_quantized(ckpt, plans, vocab, qtype: str, names, outfile: Path, rounding=None, extra=None) -> None:
    """Pure-Python types in one pass; K-quants as the checkpoint's own float type first (lossless), then
    llama.cpp's quantizer, both into hidden temporary files that are removed whatever happens."""
    if not TYPES[qtype].by_llama_cpp:
        write_gguf(ckpt, plans, vocab, qtype, names, outfile, rounding=rounding, extra=extra)
        return
    import gguf

    src = outfile.with_name(f".{outfile.name}.src.tmp-{os.getpid()}")
    out_tmp = tmp_path_for(outfile)
    try:
        write_gguf(ckpt, plans, vocab, source_type(ckpt.config), names, src, tmp=src)
        log.info("quantizing to %s with llama.cpp's quantizer", qtype.upper())
        quantize(src, out_tmp, int(gguf.LlamaFileType[TYPES[qtype].file_type]))
        check_quantized(out_tmp, int(gguf.LlamaFileType[TYPES[qtype].file_type]), len(plans))
        os.replace(out_tmp, outfile)
    finally:
        src.unlink(missing_ok=True)
        out_tmp.unlink(missing_ok=True)


# 128 -> 256 rows moved GPTQ q4_0 from 88.8% to 93.5% of f16's exact match on the demo; 512 gave no more
DEFAULT_CALIBRATION_ROWS = 256


def calibration(cfg: Config, run: RunDir | None, tok, template: PromptTemplate, qtype: str, n: int | None):
    """(token ids of up to n of the run's training rows, the dataset's name) for GPTQ rounding, or None: not a
    type it applies to, n == 0, no run (--model), or training data that cannot be read (a warning says so)."""
    if qtype not in LEVELS:
        if n is not None:
            log.warning("--calibration-rows applies to q4_0 and q5_0 (GPTQ); --type %s ignores it", qtype)
        return None
    n = DEFAULT_CALIBRATION_ROWS if n is None else n
    if n == 0:
        return None
    if run is None:
        log.info("%s: no run, so no training rows to calibrate with; rounding to nearest", qtype)
        return None
    try:
        train, _, _, _ = load_clean_split(cfg.data)
        rows = random.Random(cfg.data.seed).sample(train, min(n, len(train)))
        # a long row is still good calibration: its first max_length tokens, whatever training did with it
        data = cfg.data.model_copy(update={"too_long": "truncate"})
        enc = encode_rows(rows, template, tok, data, source_name(cfg.data))
    except UserError as e:
        log.warning(
            "%s rounds to nearest: the training rows for GPTQ cannot be read (%s); run from where training ran, "
            "or pass data.path=FILE (any rows like the training data), or --calibration-rows 0 to skip GPTQ",
            qtype,
            e,
        )
        return None
    if not enc.rows:
        log.warning("%s rounds to nearest: no training row of %s could be encoded", qtype, source_name(cfg.data))
        return None
    log.info(
        "%s: GPTQ rounding calibrated on %d training rows of %s (--calibration-rows 0 rounds to nearest)",
        qtype,
        len(enc.rows),
        source_name(cfg.data),
    )
    return [r["input_ids"] for r in enc.rows], source_name(cfg.data)


def main(
    cfg: Config,
    run: RunDir | None,
    qtype: str = "f16",
    outfile: Path | None = None,
    model_dir: Path | None = None,
    base: bool = False,
    calibration_rows: int | None = None,
) -> Path:
    """Export <run>/merged (or model_dir) to `outfile` as GGUF of type `qtype`, plus a Modelfile beside it.
    base=True: the run's base model instead, with the run's chat template, for use under the adapter GGUF.
    q4_0/q5_0 are rounded by GPTQ on `calibration_rows` (None: 256) of the run's training rows (0: to nearest)."""
    import logging

    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs every step at INFO
    # 1. What to export, read and checked before anything is written.
    qtype = parse_type(qtype)
    if TYPES[qtype].by_llama_cpp:
        require(f"--type {qtype} (a K-quant: the gguf package cannot write them)")
    src, lora, from_run = what_to_export(cfg, run, model_dir, base)
    ckpt, tok = read_source(src)
    # The base GGUF carries the run's template: llama.cpp takes the chat prompt from the model, not the adapter.
    template = load_template(run if from_run or base else None, tok)
    plans = plan_tensors(ckpt, source_type(ckpt.config) if TYPES[qtype].by_llama_cpp else qtype)
    vocab = read_vocab(tok, template, ckpt.config.vocab_size)
    n_params = sum(p.n_elements for p in plans if p.hf_name)
    names = export_names(
        ckpt.config,
        n_params,
        cfg.model.name_or_path if from_run or base else str(src),
        run.root.name if from_run else None,
    )
    outfile = outfile or default_outfile(run, names, qtype, from_run, base)
    # 2. The output claimed (a lock, the disk space) and the Modelfile built, then the GGUF written.
    total = sum(p.nbytes for p in plans)
    # a K-quant holds the float copy and the quantized file at once
    need = int(total * (1.6 if TYPES[qtype].by_llama_cpp else 1.05)) + (64 << 20)
    lock = claim_outfile(outfile, run, need, f"the {qtype} GGUF")
    adapter_ref = os.path.relpath(lora, outfile.parent.resolve()) if lora else None
    modelfile = modelfile_text(
        outfile.name, tok, template, cfg.inference, vocab.add_bos, str(src), adapter_ref
    )  # built before writing: a template problem leaves nothing behind
    log.info(
        "exporting %s -> %s (%s, %d tensors, %s parameters, tokenizer pre '%s')",
        src,
        outfile,
        qtype.upper(),
        len(plans),
        names.size_label,
        vocab.pre,
    )
    calib = calibration(cfg, run, tok, template, qtype, calibration_rows)
    rounding = CalibratedRounding(src, calib[0], qtype, n_params) if calib else None
    extra = {"quantize.gptq.rows": len(calib[0]), "quantize.gptq.dataset": calib[1]} if calib else None
    outfile.parent.mkdir(parents=True, exist_ok=True)
    with lock:
        write_quantized(ckpt, plans, vocab, qtype, names, outfile, rounding, extra)
        atomic_write_text(outfile.parent / "Modelfile", modelfile)
    if rounding:
        rounding.close()
    log.info("wrote %s (%.1f MB) and %s", outfile, outfile.stat().st_size / 1e6, outfile.parent / "Modelfile")
    if lora:
        log.info(
            "the fine-tune is the adapter over this base: `python inference.py --serve %s --lora %s`, "
            "`llama-cli -m %s --lora %s`, or `ollama create NAME -f %s`",
            outfile,
            lora,
            outfile,
            lora,
            outfile.parent / "Modelfile",
        )
    return outfile


def what_to_export(cfg: Config, run: RunDir | None, model_dir: Path | None, base: bool):
    """(the HF folder to read, the adapter GGUF a --base export goes with, whether the folder is the run's own
    merged model)."""
    lora = None
    if base:
        if run is None:
            raise UserError("--base exports a run's base model; pass --config for the run (not --model)")
        lora = adapter_for_base(run, cfg)
        model_dir = base_model_dir(cfg)
    src = model_dir or (run.merged if run else None)
    if src is None:
        raise UserError("nothing to export; pass --config for a run or --model DIR")
    if model_dir is None and not src.exists():
        raise UserError(f"no merged model in '{src}'; run merge_adapter.py first (or pass --model DIR)")
    return src, lora, run is not None and model_dir is None


def read_source(src: Path):
    """(the checkpoint's tensors and config, its tokenizer), with the RoPE kinds this writer knows checked."""
    from transformers import AutoTokenizer

    ckpt = read_checkpoint(src)
    rp = rope_params(ckpt.config)
    if rp["rope_type"] not in ("default", "llama3", "linear"):
        raise UserError(
            f"RoPE scaling '{rp['rope_type']}' is not supported by export_gguf.py (default, linear "
            "and llama3 are); use llama.cpp's convert_hf_to_gguf.py"
        )
    with user_errors(f"cannot load the tokenizer in '{src}'", "re-run merge_adapter.py (it saves the tokenizer)"):
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    return ckpt, tok


def default_outfile(run: RunDir | None, names, qtype: str, from_run: bool, base: bool) -> Path:
    """<run>/export/<llama.cpp name>.gguf; a --model export has no run to put it in."""
    if not (from_run or base):
        raise UserError("--model needs --outfile PATH (where the .gguf goes)")
    # base/ keeps the base apart from the run's own models (inference.py --serve picks the newest of those)
    return (run.export / "base" if base else run.export) / names.file_name(qtype)


def adapter_for_base(run: RunDir, cfg: Config) -> Path:
    """The adapter GGUF a --base export goes with: the run's newest, else where `--adapter` will write it."""
    found = list(run.export.glob("*-LoRA.gguf")) if run.export.is_dir() else []
    if found:
        return max(found, key=lambda f: f.stat().st_mtime).resolve()
    base, names = adapter_names(cfg, run)
    # the adapter must have a llama.cpp form (not DoRA, no trained embeddings), or the base is of no use
    plan_adapter(run.adapter, read_adapter_config(run.adapter), base, "f16")
    planned = run.export / names.file_name("f16", adapter=True)
    log.warning(
        "no adapter GGUF in '%s' yet; the Modelfile names %s: write it with `python export_gguf.py --config %s "
        "--adapter` before using the Modelfile",
        run.export,
        planned.name,
        run.root / "config.yaml",
    )
    return planned.resolve()


def base_model_dir(cfg: Config) -> Path:
    """The run's base model as a local folder: a path as is, a hub id from the local HF cache (merge used it)."""
    source, _ = resolve_model(cfg.model)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    with user_errors(
        f"the base model '{source}' is not in the local Hugging Face cache",
        f"download it (huggingface-cli download {source}) or export it with --model DIR --outfile PATH",
    ):
        return Path(snapshot_download(source, revision=cfg.model.revision, local_files_only=True))


def export_adapter(cfg: Config, run: RunDir | None, qtype: str = "f16", outfile: Path | None = None) -> Path:
    """Write <run>/adapter as a llama.cpp LoRA adapter GGUF, applied over the base model's GGUF at load time."""
    import logging

    logging.getLogger("gguf").setLevel(logging.WARNING)
    qtype = parse_type(qtype, ADAPTER_TYPES)
    if run is None:
        raise UserError("--adapter exports a run's adapter; pass --config for the run (not --model)")
    adapter_cfg = read_adapter_config(run.adapter)
    base, names = adapter_names(cfg, run)
    arch_of(base, "the base model")
    ap = plan_adapter(run.adapter, adapter_cfg, base, qtype)
    outfile = outfile or run.export / names.file_name(qtype, adapter=True)
    lock = claim_outfile(outfile, run, sum(p.nbytes for p in ap.plans) + (16 << 20), "the adapter GGUF", False)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    with lock:
        write_adapter_gguf(ap, qtype, names, outfile)
    log.info(
        "wrote %s (%.1f MB, %d LoRA pairs, alpha %g); use it over the base model's GGUF: "
        "`python export_gguf.py --config %s --base --type q4_k_m` writes one with a Modelfile that applies it",
        outfile,
        outfile.stat().st_size / 1e6,
        len(ap.plans) // 2,
        ap.alpha,
        run.root / "config.yaml",
    )
    return outfile


def adapter_names(cfg: Config, run: RunDir):
    """(the base model's config, the llama.cpp names of the run's adapter GGUF): an adapter has no weights of
    the base, so its size label comes from the config alone."""
    source, offline = resolve_model(cfg.model)
    base = causal_lm_config(cfg, source, offline)
    return base, export_names(base, config_parameters(base), cfg.model.name_or_path, run.root.name)


def config_parameters(config) -> int:
    """Parameter count from the config alone (the adapter export has no weights of the base): the model built on
    the meta device, which allocates nothing; a tied head counts once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def cli(argv) -> None:
    p = build_parser(__doc__)
    p.add_argument("--outfile", type=Path, help="the .gguf to write (default <run>/export/<llama.cpp name>.gguf)")
    p.add_argument(
        "--type",
        "--outtype",
        dest="type",
        default="f16",
        metavar="TYPE",
        help=f"weight format, any case (default f16): {', '.join(TYPES)}; --adapter: {', '.join(ADAPTER_TYPES)}",
    )
    p.add_argument("--model", type=Path, help="export this HF checkpoint folder instead of <run>/merged")
    p.add_argument("--adapter", action="store_true", help="export <run>/adapter as a llama.cpp LoRA adapter GGUF")
    p.add_argument(
        "--base",
        action="store_true",
        help="export the run's base model at --type into <run>/export/base/, with a Modelfile that applies the "
        "adapter GGUF (export it with --adapter): at 4 bits the LoRA delta then stays unrounded",
    )
    p.add_argument(
        "--calibration-rows",
        type=int,
        metavar="N",
        help="q4_0/q5_0: round with GPTQ, calibrated on N of the run's training rows (default 256; 0 rounds to "
        "nearest). The file is plain q4_0/q5_0 either way",
    )
    a = parse_args(p, argv)
    if a.calibration_rows is not None and a.calibration_rows < 0:
        raise UserError(f"--calibration-rows {a.calibration_rows} is negative; give a row count, or 0 for none")
    picked = [f for f, on in (("--adapter", a.adapter), ("--base", a.base), ("--model", a.model is not None)) if on]
    if len(picked) > 1:
        raise UserError(f"{' and '.join(picked)} pick different things to export; pass one of them")
    if a.model is not None and a.config is None:
        from ftkit.config import load_config

        cfg, run = load_config(None, a.overrides), None
    else:
        cfg, run = stage_config(a.config, a.overrides)
    if a.adapter:
        if a.calibration_rows is not None:
            log.warning("--calibration-rows applies to a model's q4_0/q5_0 weights; --adapter ignores it")
        export_adapter(cfg, run, a.type, a.outfile)
    else:
        main(cfg, run, a.type, a.outfile, a.model, a.base, a.calibration_rows)


if __name__ == "__main__":
    run_main(cli)
