"""Fuse the trained LoRA adapter into the full-precision base and check that the result is the same model.

Reads:  <run>/config.yaml, <run>/adapter/, the base at `model.name_or_path` (loaded unquantized in
        `merge.compute_dtype`, float32 by default, and saved in `merge.dtype`: merging into 4-bit weights
        would round the adapter away).
Writes: <run>/merged/ — a standard HF checkpoint (safetensors shards, tokenizer, generation config) that
        plain `AutoModelForCausalLM.from_pretrained` loads — and <run>/merged/merge_check.json: the max
        logit difference and greedy-token agreement between merged and base+adapter on fixed prompts.
        Written atomically; the check failing leaves no merged/ folder.

Run:
    python merge_adapter.py                          # the most recent run
    python merge_adapter.py --config configs/demo.yaml merge.dtype=float16
"""

from __future__ import annotations

import json

from ftkit.cli import build_parser, log, parse_args, run_main
from ftkit.config import Config
from ftkit.errors import UserError
from ftkit.models import (
    attach_adapter,
    check_same_base,
    load_causal_lm,
    load_tokenizer,
    model_skeleton,
    pick_device,
    read_adapter_config,
    resolve_model,
    torch_dtype,
)
from ftkit.paths import RunDir, atomic_dir, check_free_space, check_own_dir, save_resolved_config, stage_config
from ftkit.prompts import PromptTemplate
from ftkit.runlock import RunLock, check_unlocked, clean_tmp_leftovers


def load_base_with_adapter(cfg: Config, run: RunDir, source: str, offline: bool, dtype, device: str):
    """Unquantized base + adapter (unmerged): the model the merged one must match."""
    base = load_causal_lm(cfg, source, offline, dtype=dtype, device_map={"": device})
    return attach_adapter(base, run.adapter)


def reference_logits(model, tok, template: PromptTemplate, prompts: list[str]) -> list:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([template.prompt_ids(tok, p)], device=model.device)
            out.append((ids, model(input_ids=ids).logits.float().cpu()))
    return out


# merged/ is this stage's when it holds the merge check it writes last.
OWN_MERGED = ("merge_check.json", "merge_adapter.py")


def preflight(cfg: Config, run: RunDir) -> tuple[str, bool]:
    """Everything that can be known before the base is loaded: a complete adapter trained on this base, a
    full-precision base (not a pre-quantized checkpoint), and room on disk for the merged model. Returns
    where the base loads from (resolve_model)."""
    import torch

    check_same_base(read_adapter_config(run.adapter), cfg.model.name_or_path)
    source, offline = resolve_model(cfg.model)
    skeleton = model_skeleton(cfg, source, offline)
    q = getattr(skeleton.config, "quantization_config", None)
    if q:
        method = q.get("quant_method", "quantized") if isinstance(q, dict) else getattr(q, "quant_method", "quantized")
        raise UserError(
            f"model.name_or_path '{source}' is a {method} checkpoint; merging into quantized weights "
            "would round the adapter away. Merge into the full-precision base the 4-bit model was made "
            "from (finetune.py quantizes it on the fly)"
        )
    n_params = sum(p.numel() for p in skeleton.parameters())
    check_free_space(
        run.root, int(n_params * torch.finfo(torch_dtype(cfg.merge.dtype)).bits / 8 * 1.1), "the merged model"
    )
    return source, offline


def main(cfg: Config, run: RunDir) -> dict:
    import torch

    device = pick_device(cfg.merge.device)
    dtype = torch_dtype(cfg.merge.compute_dtype)
    template = PromptTemplate.load(run.prompt_template)
    check_unlocked(run.root)
    # A merge killed mid-save leaves a .merged.tmp-PID as big as the model: found and removed here.
    clean_tmp_leftovers(run.root, names=("merged",))
    check_own_dir(run.merged, *OWN_MERGED)  # before the model loads; atomic_dir checks again under the lock
    source, offline = preflight(cfg, run)
    peft_model = load_base_with_adapter(cfg, run, source, offline, dtype, device)
    tok = load_tokenizer(cfg, str(run.adapter), True)

    # Logits of base+adapter and of the base alone first: merging rewrites the base weights in place.
    refs = reference_logits(peft_model, tok, template, cfg.merge.check_prompts)
    with peft_model.disable_adapter():
        bases = reference_logits(peft_model, tok, template, cfg.merge.check_prompts)
    merged = peft_model.merge_and_unload()
    max_diff, agree, total, from_base = 0.0, 0, 0, 0.0
    finite = True
    with torch.no_grad():
        for (ids, ref), (_, plain) in zip(refs, bases):
            got = merged(input_ids=ids).logits.float().cpu()
            # max() of a number and NaN keeps the number: NaN logits must fail the check on their own.
            finite = finite and bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all())
            max_diff = max(max_diff, (got - ref).abs().max().item())
            from_base = max(from_base, (got - plain).abs().max().item())
            agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
            total += ids.numel()
    check = {
        "max_logit_diff": round(max_diff, 5),
        "max_logit_diff_from_base": round(from_base, 5),
        "token_agreement": round(agree / total, 5),
        "positions": total,
        "compute_dtype": cfg.merge.compute_dtype,
        "saved_dtype": cfg.merge.dtype,
        "tolerance": {"max_logit_diff": cfg.merge.max_logit_diff, "min_token_agreement": cfg.merge.min_token_agreement},
        "prompts": cfg.merge.check_prompts,
    }
    log.info(
        "merge check: max logit diff %.4f, greedy-token agreement %.3f over %d positions",
        check["max_logit_diff"],
        check["token_agreement"],
        total,
    )
    if not finite:
        raise UserError(
            "the model gives non-finite logits (inf or NaN) on the check prompts; nothing was written. "
            "The adapter's weights are broken (a diverged run): train again with a lower "
            "train.learning_rate"
        )
    if from_base == 0.0:
        # Merged == base+adapter proves nothing when both are the base: an adapter that changes no logit (all
        # zero: never trained, or its weights did not load) would be written out as the fine-tuned model.
        raise UserError(
            f"the merged model gives exactly the base model's logits on the check prompts: the adapter in "
            f"'{run.adapter}' changes nothing (untrained, or zero weights); nothing was written. Train it "
            "(finetune.py) or use the run whose adapter you meant"
        )
    if max_diff > cfg.merge.max_logit_diff or check["token_agreement"] < cfg.merge.min_token_agreement:
        raise UserError(
            f"the merged model disagrees with base+adapter (max logit diff {max_diff:.3f}, agreement "
            f"{check['token_agreement']:.3f}); nothing was written. Check that the adapter matches the base, "
            "or raise merge.max_logit_diff if this is float16/bfloat16 rounding"
        )
    merged = merged.to(torch_dtype(cfg.merge.dtype))
    merged.config.use_cache = True
    merged.config.name_or_path = str(run.merged)
    if merged.generation_config is not None:
        stops = template.stop_token_ids
        merged.generation_config.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else None)
        merged.generation_config.pad_token_id = tok.pad_token_id
    with RunLock(run.root, "merge_adapter.py"), atomic_dir(run.merged, *OWN_MERGED) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=cfg.merge.max_shard_size)
        tok.save_pretrained(tmp)
        (tmp / "merge_check.json").write_text(json.dumps(check, indent=2) + "\n")
        save_resolved_config(cfg, tmp / "config.yaml")
    log.info("merged model written to %s", run.merged)
    return check


def cli(argv) -> None:
    a = parse_args(build_parser(__doc__), argv)
    cfg, run = stage_config(a.config, a.overrides)
    main(cfg, run)


if __name__ == "__main__":
    run_main(cli)
