"""LoRA variants through PEFT's LoraConfig (DoRA, PiSSA, OLoRA, gaussian init, modules_to_save): each trains,
merges with the merge check holding, answers and exports, on the tiny model as a user runs the stages."""

import json

import pytest
from helpers import REPO, run_script, tiny_overrides
from safetensors import safe_open

VARIANTS = {
    # DoRA on the 4-bit base: the magnitude vectors are trained and saved beside A and B.
    "dora-gaussian": {"lora.use_dora": "true", "lora.init_lora_weights": "gaussian"},
    # OLoRA re-quantizes the residual 4-bit base; the adapter is converted back to a plain LoRA on the base.
    "olora": {"lora.init_lora_weights": "olora"},
    # PiSSA needs a full-precision base; its adapter too is converted (rank 2r) to fit the untouched base.
    "pissa-full-precision": {"lora.init_lora_weights": "pissa_niter_4", "quant.load_in_4bit": "false"},
    # The output head trained in full and saved with the adapter (the tiny model ties it to the embeddings).
    "modules-to-save": {"lora.modules_to_save": "[lm_head]", "lora.target_modules": "[q_proj,v_proj]"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_merges_and_answers(tmp_path, tiny_llama, alpaca_file, variant):
    run = tmp_path / "run"
    extra = {"train.max_steps": 2, "train.save_steps": 2, "train.eval_steps": 2, **VARIANTS[variant]}
    args = ["--config", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tiny_llama, alpaca_file, run, **extra)]
    r = run_script("finetune.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    acfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    r_cfg = 16  # configs/demo.yaml's lora.r
    if variant == "dora-gaussian":
        assert acfg["use_dora"] is True and any("lora_magnitude_vector" in k for k in keys)
    if variant in ("olora", "pissa-full-precision"):
        # Converted: a plain-LoRA config at twice the rank, A and B of rank 2r.
        assert acfg["init_lora_weights"] is True and acfg["r"] == 2 * r_cfg
        assert all(shapes[k][0] == 2 * r_cfg for k in keys if "lora_A" in k)
    if variant == "modules-to-save":
        assert acfg["modules_to_save"] == ["lm_head"] and any("lm_head" in k for k in keys)

    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["max_logit_diff"] < 0.05 and check["token_agreement"] == 1.0, check

    # The merged model and base + adapter (unmerged) both answer (the random tiny model's text means nothing).
    for use, folder in (("--merged", "merged"), ("--adapter", "adapter")):
        r = run_script(
            "inference.py", "--config", str(run / "config.yaml"), use, "--prompt", "Add the numbers.", cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "answering with" in r.stderr and str(run / folder) in r.stderr, r.stderr[-2000:]

    # The export reads merged/ and verifies the GGUF by loading it back with transformers.
    r = run_script("export_gguf.py", "--config", str(run / "config.yaml"), "--type", "f32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((run / "export").glob("*-F32.gguf"))) == 1 and (run / "export" / "Modelfile").is_file()
