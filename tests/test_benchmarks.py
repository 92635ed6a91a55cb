"""Benchmarks cannot rot: every script in benchmarks/ runs here as a user runs it (`python benchmarks/X.py --tiny
...`, a real process) on the CPU with a tiny model, the shipped demo data and a few steps, and its results JSON
must hold every variant with sane numbers (positive, finite, none recorded as failed). `make bench-smoke` runs
this file (`pytest -m bench`); `make test-all` includes it.

The GPU benchmarks' --tiny mode runs the same code on a 2-layer model (see each script's docstring); only what a
CPU cannot run at all is skipped there, and the script records it under "skipped" with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import REPO, copy_run, run_script

pytestmark = pytest.mark.bench

TIMEOUT = 300  # each script takes well under a minute on 2 cores; this is only a hang guard


def bench(script: str, out: Path, *args: str) -> dict:
    """benchmarks/<script> --out <out> *args as its own process; its results JSON."""
    r = run_script(f"benchmarks/{script}", *args, "--out", str(out), process=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert out.is_file(), f"{script} wrote no results to {out}"
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_variants(variants: dict, expected: set[str]) -> None:
    """Every expected variant is there, none failed."""
    assert expected <= set(variants), f"missing variants: {sorted(expected - set(variants))}"
    failed = {n: v.get("error") or v.get("first_attempt_error") or v.get("skipped") for n, v in variants.items()}
    failed = {n: e for n, e in failed.items() if e}
    assert not failed, f"variants failed: {json.dumps(failed, indent=1)[:3000]}"


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"common", "__init__"}
    tests = {n.removeprefix("test_") for n in globals() if n.startswith("test_")}
    assert scripts <= tests, f"benchmarks without a smoke test here: {sorted(scripts - tests)}"


# -- train_throughput.py ----------------------------------------------------------------------------------
TRAIN_VARIANTS = {
    "plain_alpaca_b2x4",
    "plain_fixed128_b2x4",
    "plain_trl_yaml_b8x2_gc",
    "project_yaml_default",
    *(
        f"project_yaml_{n}"
        for n in (
            "attn_sdpa_dense_mask",
            "no_liger",
            "checkpointing",
            "micro_b8x2",
            "micro_b8x2_checkpointing",
            "padded",
        )
    ),
    "project_throughput_pack1024",
    "project_alpaca_same_b8x1_gc",
    "project_alpaca_same_b4x2_gc",
    "project_alpaca_same_b8x1_nogc",
    "project_alpaca_pack512",
    "project_alpaca_pack1024",
    "project_fixed128_pack1024",
}
PROBES = {"plain_long_256", "project_long_256", "project_long_tiled_256"}


def test_train_throughput(tmp_path, offline_llama):
    # Every variant of the H200 benchmark (plain TRL, the project's path, the YAML's batch and its ablations,
    # the throughput mode, packs, long-row probes, the contamination check) on a tiny model of Llama-3's
    # architecture built by the script, the shipped demo rows.
    res = bench("train_throughput.py", tmp_path / "tt.json", "--tiny", "--tokenizer", str(offline_llama))
    v = res["variants"]
    check_variants(v, TRAIN_VARIANTS | PROBES | {"contamination_check"})
    # only what a CPU cannot run at all is left out, and said so
    assert set(res.get("skipped", {})) == {
        "project_yaml_attn_flex_attention",
        "project_long_tiled_offload32",
        "unsloth_yaml_b8x2",
    }
    # Unsloth is never installed with the project (its trl pin excludes ours) and needs a GPU: the reason is kept
    assert "unsloth" in res["skipped"]["unsloth_yaml_b8x2"].lower() or "CUDA" in res["skipped"]["unsloth_yaml_b8x2"]
    for n in TRAIN_VARIANTS:
        r = v[n]
        for k in ("step_s", "real_tokens_per_s", "real_tokens_per_step", "rows_per_step", "wall_s"):
            assert positive(r[k]), (n, k, r[k])
        assert r["steps_timed"] >= 1 and all(math.isfinite(x) for x in r["first_losses"]), (n, r)
    for n in PROBES:
        assert v[n]["L"] == 256 and positive(v[n]["step_s"]), (n, v[n])
    c = v["contamination_check"]
    assert c["max_rel_diff_packed_vs_alone"] < c["max_rel_diff_contaminated_control"], c
    s = res["summary"]
    for k in ("ratio_same_batch", "ratio_default", "ratio_yaml_default_vs_plain_b2x4"):
        assert positive(s[k]), (k, s)
    # the same rows and weights: the plain recipe and the project's path start from the same loss
    assert s["first_step_loss_rel_diff"] < 1e-3, s

    # --cpu: the demo comparison (plain, project default, padding-free) on the same kind of model
    res = bench("train_throughput.py", tmp_path / "tt_cpu.json", "--cpu", "--tiny", "--tokenizer", str(offline_llama))
    check_variants(res["variants"], {"plain_demo", "project_demo_default", "project_demo_padding_free"})
    for n, x in res["summary"]["median_tokens_per_s"].items():
        assert positive(x), (n, x)


def test_liger_calibration_takes_only_runs_that_really_ran_without_liger(tmp_path, monkeypatch):
    # liger stays patched in a process once applied: an "off" run after an "on" one is no baseline (issue 27)
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks import train_throughput as tt
    from ftkit import kernel_table

    on = {"real_tokens_per_s": 9000.0, "switches": {"tokens_per_micro_batch": 3302, "use_liger_kernel": True}}
    v = {
        "project_yaml_liger_on_r0": dict(on, liger_active=True),
        "project_yaml_liger_off_r0": {"real_tokens_per_s": 8000.0, "liger_active": False},
        "project_yaml_liger_on_r1": dict(on, liger_active=True),
        "project_yaml_liger_off_r1": {"real_tokens_per_s": 9500.0, "liger_active": True},
        "project_yaml_default": dict(on, liger_active=True),
        "project_yaml_no_liger": {"real_tokens_per_s": 9900.0},  # an old file: which norm ran is unknown
    }
    rows = tt.liger_pairs(v, "today")
    assert [(r["source"], r["off_tokens_per_s"]) for r in rows] == [
        ("project_yaml_liger_on_r0 vs project_yaml_liger_off_r0", 8000.0)
    ]
    # --calibrate writes them where the plan reads them, and refuses a CPU smoke run's numbers
    monkeypatch.setattr(kernel_table, "TABLE", tmp_path / "kernel_table.json")
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"device": "NVIDIA H200", "tiny": False, "variants": v, "date_utc": "d"}))
    table = tt.calibrate([str(gpu)])
    assert kernel_table.load() == table and [r["source"] for r in table["NVIDIA H200"]["liger"]] == [
        "gpu.json: project_yaml_liger_on_r0 vs project_yaml_liger_off_r0"
    ]
    assert kernel_table.decide("liger", "NVIDIA H200", 3000).on  # 9000 vs 8000
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"device": "cpu (2 cores)", "tiny": True, "variants": v}))
    with pytest.raises(SystemExit, match="not a GPU run"):
        tt.calibrate([str(cpu)])


# -- generate_throughput.py -------------------------------------------------------------------------------
def test_generate_throughput(tmp_path):
    res = bench("generate_throughput.py", tmp_path / "gen.json", "--tiny")
    v = res["variants"]
    check_variants(v, {f"{m}_b{b}" for m in ("plain", "project", "hf_compiled") for b in (1, 4)})
    for n, r in v.items():
        assert r["new_tokens"] == 16, (n, r)
        for k in ("tokens_per_s", "decode_ms_per_step", "decode_tokens_per_s", "prefill_plus_first_token_s"):
            assert positive(r[k]), (n, k, r[k])
    for b in ("b1", "b4"):
        assert positive(res["summary"][b]["speedup"]), res["summary"]


# -- conversation_loading.py ------------------------------------------------------------------------------
def test_conversation_loading(tmp_path, embedded_model):
    res = bench("conversation_loading.py", tmp_path / "conv.json", "--tiny", "--model", str(embedded_model))
    assert res["rows"] == 300 and 0 < res["train_rows"] <= 300, res
    assert positive(res["tokens"]) and positive(res["tokenize_s"]) and positive(res["total_s"]), res
    for k in ("read_s", "check_s", "split_s"):
        assert math.isfinite(res[k]) and res[k] >= 0, (k, res[k])


# -- gguf_export_8b.py ------------------------------------------------------------------------------------
def test_gguf_export_8b(tmp_path, embedded_model):
    res = bench("gguf_export_8b.py", tmp_path / "g8.json", "--tiny", "--tokenizer", str(embedded_model))
    v = res["variants"]
    check_variants(v, {"round_to_nearest", "gptq_256_rows"})
    for n, r in v.items():
        assert positive(r["wall_s"]) and positive(r["size_gb"]) and positive(r["rss_mib"]), (n, r)
    assert any("GPTQ rounding took" in ln for ln in v["gptq_256_rows"]["log"]), v["gptq_256_rows"]
    assert not any("GPTQ" in ln for ln in v["round_to_nearest"]["log"]), v["round_to_nearest"]


# -- gguf_quality.py --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, tiny_run) -> Path:
    """The session's tiny trained run (conftest), copied and merged (merge_adapter.py): what gguf_quality.py
    takes, a finished run with merged/."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("bench-run") / "run")
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr[-4000:]
    return run


@pytest.mark.llamacpp
def test_gguf_quality(tmp_path, merged_run):
    # the run's held-out rows and 8 of the shipped demo tasks, which are verifiable (exact match is scored)
    extra = str(REPO / "data" / "demo_tasks.jsonl")
    res = bench("gguf_quality.py", tmp_path / "ggq.json", "--tiny", "--run", str(merged_run), "--extra-rows", extra)
    t = res["types"]
    assert set(t) == {"f16", "q4_0", "q4_0+lora"}, t
    assert res["held_out_rows"] > 0 and res["rows"] == res["held_out_rows"] + 8, res
    for n, r in t.items():
        for k in ("size_mb", "perplexity", "export_s", "generate_tok_s"):
            assert positive(r[k]), (n, k, r[k])
        assert 0 <= r["top1_agreement"] <= 1 and 0 <= r["exact_match"] <= 1 and r["verifiable_rows"] >= 8, (n, r)
    assert t["f16"]["top1_agreement"] == 1.0  # the reference against itself
    assert t["q4_0"]["size_mb"] < t["f16"]["size_mb"]


# -- time_to_quality.py -----------------------------------------------------------------------------------
def test_time_to_quality(tmp_path, offline_llama):
    res = bench("time_to_quality.py", tmp_path / "ttq.json", "--tiny", "--model", str(offline_llama))
    v = res["variants"]
    check_variants(v, {"plain", "default", "packed_linear"})
    for n, r in v.items():
        assert r["steps"] >= 1 and positive(r["train_s"]) and positive(r["eval_loss_by_epoch"]["1"]), (n, r)
        assert r["points"] and all(positive(p["eval_loss"]) for p in r["points"]), (n, r)
    assert v["packed_linear"]["micro_batch"] == 1 and v["plain"]["padding_free"] is False, v
    assert positive(res["summary"]["target_loss_plain_epoch1"]), res["summary"]


def test_grpo_throughput(tmp_path, offline_llama):
    # plain TRL GRPOTrainer and finetune.py's GRPO path on the same prompts, one timed step each on a 2-layer model
    res = bench("grpo_throughput.py", tmp_path / "gt.json", "--tiny", "--tokenizer", str(offline_llama))
    v = res["variants"]
    check_variants(v, {"plain_grpo", "project_grpo"})
    for n, r in v.items():
        assert r["completions_per_step"] == 16 and positive(r["completions_per_s"]), (n, r)  # 2 prompts x 8
        assert 0 < r["sampling_share"] < 1 and 0 < r["mean_completion_tokens"] <= 8, (n, r)
    assert res["project_plan"]["method"] == "grpo" and res["project_plan"]["generator"] == "transformers", res
    assert positive(res["summary"]["ratio_project_vs_plain"]), res


def test_preference_throughput(tmp_path, offline_llama):
    # plain TRL DPOTrainer and finetune.py's DPO path on the same pairs, one timed step each on a 2-layer model
    res = bench("preference_throughput.py", tmp_path / "pt.json", "--tiny", "--tokenizer", str(offline_llama))
    v = res["variants"]
    check_variants(v, {"plain_dpo_b8x2", "project_dpo_yaml"})
    for n, r in v.items():
        assert r["rows_per_step"] == 16 and positive(r["real_tokens_per_s"]), (n, r)  # the YAML's 8 x 2 pairs
        assert r["first_losses"][0] == pytest.approx(0.6931, abs=1e-3), (n, r)  # DPO at the reference: log 2
    # both read the same pairs: the same tokens a step, counted as trained (both sides with the prompt)
    assert v["plain_dpo_b8x2"]["real_tokens_per_step"] == v["project_dpo_yaml"]["real_tokens_per_step"], v
    assert res["project_plan"]["method"] == "dpo" and positive(res["summary"]["ratio_project_vs_plain"]), res
