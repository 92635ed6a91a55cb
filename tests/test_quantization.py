"""The 4-bit setup maps config keys onto BitsAndBytesConfig, and LoRA targets are checked against the model."""

import pytest
import torch

from ftkit.config import QuantCfg
from ftkit.errors import UserError
from ftkit.quant import build_bnb_config, linear_module_names, validate_target_modules


def test_nf4_double_quant_bf16():
    b = build_bnb_config(QuantCfg())
    assert b.load_in_4bit and b.bnb_4bit_quant_type == "nf4" and b.bnb_4bit_use_double_quant
    assert b.bnb_4bit_compute_dtype == torch.bfloat16


def test_fp4_fp16_and_storage():
    b = build_bnb_config(
        QuantCfg(
            bnb_4bit_quant_type="fp4",
            bnb_4bit_compute_dtype="float16",
            bnb_4bit_use_double_quant=False,
            bnb_4bit_quant_storage="bfloat16",
        )
    )
    assert b.bnb_4bit_quant_type == "fp4" and b.bnb_4bit_compute_dtype == torch.float16
    assert not b.bnb_4bit_use_double_quant and b.bnb_4bit_quant_storage == torch.bfloat16


def test_8bit_and_none():
    assert build_bnb_config(QuantCfg(load_in_4bit=False, load_in_8bit=True)).load_in_8bit
    assert build_bnb_config(QuantCfg(load_in_4bit=False)) is None


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def test_linear_layers_listed_with_counts(model):
    names = linear_module_names(model)
    assert names == {
        "q_proj": 2,
        "k_proj": 2,
        "v_proj": 2,
        "o_proj": 2,
        "gate_proj": 2,
        "up_proj": 2,
        "down_proj": 2,
        "lm_head": 1,
    }


def test_target_validation(model):
    assert validate_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert validate_target_modules(model, "all-linear") == "all-linear"
    with pytest.raises(UserError) as e:
        validate_target_modules(model, ["q_proj", "qkv_proj"])
    assert "qkv_proj" in str(e.value) and "gate_proj" in str(e.value) and "lm_head" not in str(e.value)


def test_list_modules_cli(tiny_llama):
    from helpers import run_script

    r = run_script(
        "quantization_utils.py",
        "--config",
        "configs/demo.yaml",
        "--list-modules",
        f"model.name_or_path={tiny_llama}",
        "model.gguf_source=null",
    )
    assert r.returncode == 0, r.stderr
    assert "q_proj: 2" in r.stdout and "bnb_4bit_quant_type: nf4" in r.stdout and "output head" in r.stdout
