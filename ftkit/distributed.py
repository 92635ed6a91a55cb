"""Who and where this process is: world size, rank, FSDP, the device, and the checks that refuse a setup
which would quietly train on fewer devices than the user has."""

from __future__ import annotations

import os

from .config import Config, mutates_base
from .errors import UserError
from .models import pick_device
from .plan import Hardware, detect_hardware


def dist_info() -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "world_size": world,
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
    }


def is_main() -> bool:
    return dist_info()["rank"] == 0


def barrier() -> None:
    if dist_info()["world_size"] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def env_flag(name: str) -> bool:
    """A boolean that `accelerate launch` exports to every process ("true"; "1"/"yes" when set by hand)."""
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def elastic_shutdown_timeout() -> str | None:
    """When torchrun (accelerate launch) started this process: its launcher's shutdown timeout in seconds (it
    forwards signals to the workers, then kills them after that long); None otherwise."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    return os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")


def fsdp_enabled() -> bool:
    """`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP=true to every process."""
    return env_flag("ACCELERATE_USE_FSDP")


def fsdp_version() -> int:
    """`accelerate launch` exports the config's fsdp_version as FSDP_VERSION (1 when the config has none)."""
    return int(os.environ.get("FSDP_VERSION", "1") or 1)


def check_fsdp2_available() -> None:
    """FSDP2 is torch's fully_shard (public in torch.distributed.fsdp from 2.6); Accelerate fails deep in its
    setup without it."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        import torch

        raise UserError(
            f"the Accelerate config asks for FSDP2 (fsdp_version: 2), which needs torch >= 2.6 "
            f"(torch.distributed.fsdp.fully_shard); this torch is {torch.__version__}: upgrade torch, or launch "
            "with configs/accelerate/fsdp_qlora.yaml (FSDP1)"
        ) from None


def check_distributed(cfg: Config, device: str) -> dict:
    """Refuse setups that would quietly train on fewer devices than the user has, and FSDP settings that
    cannot work; returns the distributed facts for the log and the run summary."""
    info = dict(dist_info(), fsdp=fsdp_enabled())
    if info["fsdp"]:
        info["fsdp_version"] = fsdp_version()
        if info["fsdp_version"] == 2:
            check_fsdp2_available()
        q = cfg.quant
        if q.load_in_8bit:
            raise UserError(
                "FSDP cannot shard 8-bit bitsandbytes weights; set quant.load_in_4bit=true "
                "quant.load_in_8bit=false, or launch with configs/accelerate/ddp.yaml"
            )
        if q.load_in_4bit and q.bnb_4bit_quant_storage != q.bnb_4bit_compute_dtype:
            raise UserError(
                f"FSDP shards the 4-bit weights only when they are stored in the compute dtype: set "
                f"quant.bnb_4bit_quant_storage={q.bnb_4bit_compute_dtype} (now "
                f"{q.bnb_4bit_quant_storage}, quant.bnb_4bit_compute_dtype={q.bnb_4bit_compute_dtype})"
            )
        if q.load_in_4bit and cfg.model.dtype != q.bnb_4bit_quant_storage:
            raise UserError(
                f"FSDP needs one dtype for every weight: set model.dtype={q.bnb_4bit_quant_storage} "
                f"to match quant.bnb_4bit_quant_storage (now model.dtype={cfg.model.dtype})"
            )
        if "8bit" in cfg.train.optim:
            raise UserError(
                f"train.optim={cfg.train.optim} fails when FSDP saves a checkpoint (a known PEFT/bitsandbytes "
                "limit); use train.optim=adamw_torch under FSDP"
            )
        if mutates_base(cfg.lora.init_lora_weights):
            raise UserError(
                f"lora.init_lora_weights={cfg.lora.init_lora_weights} under FSDP is not supported: its adapter must "
                "be converted against its initial weights when saved, which the sharded save here does not do; use "
                "true or gaussian, or train on one process"
            )
        if device != "cuda":
            raise UserError("FSDP needs CUDA GPUs; on CPU launch with configs/accelerate/ddp.yaml instead")
        # Both recompute activations and transformers refuses the pair; the plan turns ours off (and says so).
        info["fsdp_activation_checkpointing"] = env_flag("FSDP_ACTIVATION_CHECKPOINTING")
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if info["world_size"] == 1 and n > 1:
            raise UserError(
                f"{n} GPUs are visible but finetune.py runs as a single process, which trains on one GPU "
                f"only; use all of them with `accelerate launch --config_file configs/accelerate/ddp.yaml "
                f"--num_processes {n} finetune.py ...`, or choose one with CUDA_VISIBLE_DEVICES=0"
            )
        if info["world_size"] > 1 and info["local_rank"] >= n:
            raise UserError(
                f"process LOCAL_RANK={info['local_rank']} has no GPU of its own (this machine shows {n}); "
                f"launch at most {n} processes per machine (accelerate launch --num_processes)"
            )
    if info["world_size"] > 1 or "LOCAL_RANK" in os.environ:
        # Start the process group now: model loading and the barriers below need it, and under FSDP
        # transformers loads the weights on local rank 0 only once it sees the group.
        from accelerate import PartialState

        PartialState(cpu=device == "cpu")
    return info


def setup(cfg: Config) -> Hardware:
    """This process's hardware, after the checks above; under a launcher the process group is up after it."""
    device = pick_device(cfg.train.device)
    if cfg.train.bf16 and device == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise UserError(
                "train.bf16 is on but this GPU has no bf16; set train.bf16=false and "
                "quant.bnb_4bit_compute_dtype=float16"
            )
    info = check_distributed(cfg, device)
    barrier()
    return detect_hardware(device, info["world_size"], info["fsdp"], info.get("fsdp_activation_checkpointing", False))
