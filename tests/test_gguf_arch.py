"""export_gguf.py for every architecture it maps (ftkit.gguf.ARCHS): tiny models built from transformers' own
config classes, exported, and read back.

Fast tier: the Llama bytes as they were before the architecture tables (a hash of a deterministic export), and for
each architecture an f16 export whose tensor names, shapes and metadata keys are checked against the gguf
package's tables (what llama.cpp loads by). `llamacpp`: each export loaded in llama.cpp, its logits compared
with transformers' for the same token ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import build_tiny_model

import export_gguf
from ftkit.config import load_config

# sha256 of export_gguf.py's output for build_tiny_model(llama, seed 0) with the SmolLM2 tokenizer, written by the
# Llama-only writer (commit 3b95f3b) before the writer was built from the gguf package's tables: Llama files
# must stay byte for byte what they were.
LLAMA_BYTES = {
    ("tied", "f16"): "1ce394e3ad39267d422339462ee2038bfa97ca59dee81cb2dc371a787afc4179",
    ("untied", "q8_0"): "ff3fdfdf70dac30efcd59b24e29b1c489fa648c6c063f3cdc1696eadc0cc5d1c",
}


@pytest.fixture(scope="session")
def smol_tok(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


@pytest.mark.parametrize("tie,qtype", sorted(LLAMA_BYTES))
def test_llama_export_keeps_its_bytes(tmp_path, smol_tok, tie, qtype):
    # the folder's name becomes general.name, so it is fixed
    model = build_tiny_model(tmp_path / f"tiny-llama-{tie}", "llama", smol_tok, seed=0, tied=tie == "tied")
    out = export_gguf.main(load_config(None), None, qtype, tmp_path / "out" / "m.gguf", model_dir=model)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == LLAMA_BYTES[(tie, qtype)]


# The demo model (SmolLM2-135M-Instruct, converted from its packaged GGUF), exported by the same Llama-only writer.
DEMO_BYTES = {
    "f16": "b5afa2c200ba4343f5c1d898f7c0555026a5dc5b9879eff161fa86a23e26e5b8",
    "q8_0": "fca4d8c47f29cd631069bc25cc5fdf7f42dd0b5c2aef6189a27d5fd9a34e568f",
}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", sorted(DEMO_BYTES))
def test_demo_model_export_keeps_its_bytes(tmp_path, embedded_model, qtype):
    out = export_gguf.main(load_config(None), None, qtype, tmp_path / "m.gguf", model_dir=Path(embedded_model))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == DEMO_BYTES[qtype]
