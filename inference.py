"""Generate with the fine-tuned model, using exactly the prompt template it was trained with.

Reads:  <run>/config.yaml and <run>/prompt_template.json; <run>/merged/ when present, else the base at
        `model.name_or_path` plus <run>/adapter/ (or force either with --merged / --adapter;
        --base answers with the untouched base model, for comparison).
Writes: the answer to stdout, streamed token by token.

Run:
    python inference.py --prompt "Give three tips for staying healthy."
    python inference.py --prompt "Summarize this." --input "Some text ..." inference.do_sample=true
    python inference.py --config configs/demo.yaml --adapter --prompt "..."
"""
from __future__ import annotations

from pathlib import Path

from ftkit.config import Config, InferenceCfg, build_parser, parse_args
from ftkit.log import UserError, log, run_main
from ftkit.models import load_causal_lm, load_tokenizer, pick_device, resolve_model, torch_dtype
from ftkit.paths import RunDir, stage_config
from ftkit.prompts import PromptTemplate


def choose_weights(cfg: Config, run: RunDir, use: str) -> str:
    if use == "auto":
        use = "merged" if (run.merged / "config.json").is_file() else "adapter"
    if use == "merged" and not (run.merged / "config.json").is_file():
        raise UserError(f"no merged model in '{run.merged}'; run merge_adapter.py first or pass --adapter")
    if use == "adapter" and not (run.adapter / "adapter_config.json").is_file():
        raise UserError(f"no adapter in '{run.adapter}'; run finetune.py first (or check paths.output_dir)")
    return use


def load_for_inference(cfg: Config, run: RunDir, use: str):
    """(model, tokenizer, template, what) for generation; `what` says which weights answered."""
    use = choose_weights(cfg, run, use)
    device = pick_device(cfg.inference.device)
    dtype = torch_dtype(cfg.model.dtype)
    template = PromptTemplate.load(run.prompt_template)
    if use == "merged":
        model = load_causal_lm(cfg, str(run.merged), True, dtype=dtype, device_map={"": device})
        tok = load_tokenizer(cfg, str(run.merged), True)
    else:
        source, offline = resolve_model(cfg.model)
        model = load_causal_lm(cfg, source, offline, dtype=dtype, device_map={"": device})
        tok = load_tokenizer(cfg, source, offline)
        if use == "adapter":
            from merge_adapter import attach_adapter, check_same_base, read_adapter_config
            check_same_base(read_adapter_config(run.adapter), cfg.model.name_or_path)
            model = attach_adapter(model, run.adapter)
    model.eval()
    log.info("answering with %s", {"merged": run.merged, "adapter": f"base + {run.adapter}",
                                   "base": f"base model {cfg.model.name_or_path}"}[use])
    return model, tok, template, use


def generation_kwargs(icfg: InferenceCfg, template: PromptTemplate, tok) -> dict:
    kw = dict(max_new_tokens=icfg.max_new_tokens, do_sample=icfg.do_sample,
              repetition_penalty=icfg.repetition_penalty, pad_token_id=tok.pad_token_id,
              eos_token_id=template.stop_token_ids or tok.eos_token_id)
    if icfg.do_sample:
        kw.update(temperature=icfg.temperature, top_p=icfg.top_p, top_k=icfg.top_k)
    else:  # keep generation_config's sampling defaults from warning about being ignored
        kw.update(temperature=None, top_p=None, top_k=None)
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
             progress: bool = False) -> list[str]:
    """Batched greedy/sampled generation: prompts sorted by length (less padding), left-padded."""
    import torch
    from tqdm import tqdm
    encoded = encode_prompts(tok, template, rows, context_limit(model), icfg.max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    kw = generation_kwargs(icfg, template, tok)
    batches = [order[i:i + icfg.batch_size] for i in range(0, len(order), icfg.batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2):
        width = max(len(encoded[i]) for i in batch)
        # Left padding keeps every prompt's last token at the end, where generation continues from.
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kw)
        for row, i in enumerate(batch):
            answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


def stream_one(model, tok, template: PromptTemplate, instruction: str, input_text: str | None,
               icfg: InferenceCfg) -> str:
    import torch
    from transformers import TextStreamer
    ids = encode_prompts(tok, template, [(instruction, input_text)], context_limit(model), icfg.max_new_tokens)[0]
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device), streamer=streamer,
                             **generation_kwargs(icfg, template, tok))
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


def main(cfg: Config, run: RunDir, prompt: str, input_text: str | None = None, use: str | None = None) -> str:
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt")
    model, tok, template, _ = load_for_inference(cfg, run, use or cfg.inference.use)
    return stream_one(model, tok, template, prompt, input_text, cfg.inference)


def cli(argv) -> None:
    p = build_parser(__doc__)
    p.add_argument("--prompt", help="the instruction")
    p.add_argument("--compare", type=int, metavar="N",
                   help="answer N held-out rows with the base and the fine-tuned model, side by side")
    p.add_argument("--input", default=None, help="Alpaca's optional input field")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merged", dest="use", action="store_const", const="merged", help="use <run>/merged")
    g.add_argument("--adapter", dest="use", action="store_const", const="adapter", help="base + <run>/adapter")
    g.add_argument("--base", dest="use", action="store_const", const="base", help="the base model alone")
    a = parse_args(p, argv)
    cfg, run = stage_config(a.config, a.overrides)
    if a.compare:
        compare(cfg, run, a.compare)
    elif a.prompt is None:
        raise UserError("nothing to do; pass --prompt TEXT (or --compare N)")
    else:
        main(cfg, run, a.prompt, a.input, a.use)


if __name__ == "__main__":
    run_main(cli)
