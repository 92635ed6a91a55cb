"""Is a checkpoint (or a weights file) whole? Cheap structural checks that read headers, not tensors, so a
file cut off by a kill or a full disk is found before a resume or a load trips over it."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from .cli import log
from .errors import UserError
from .jsonl import loads

CHECKPOINT_FILES = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unreadable (cut off, corrupt header), or None. Checks that the header
    parses and that the data it describes ends exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "cut off (no header)"
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 * 2**20):
                return "cut off or corrupt (header longer than the file)"
            header = loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"unreadable ({str(e)[:80]})"
    if not isinstance(header, dict):
        return "corrupt header"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"corrupt header (tensor '{name}')"
    if 8 + n + end != size:
        return f"cut off ({size} bytes, the header describes {8 + n + end})"
    return None


def torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip; a cut-off one has no central directory at its end."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if path.stat().st_size < 64 * 2**20 else None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"cut off or corrupt ({str(e)[:60]})"
    return f"corrupt member {bad}" if bad else None


def checkpoint_missing(c: Path) -> list[str]:
    """What a checkpoint lacks for a resume, or what of it is cut off. trainer_state.json is written last,
    so with it parseable the rest was written, but a full disk or a bad copy can still cut a file short.
    FSDP writes the model and optimizer as sharded folders instead of single files."""
    missing = []
    for f in CHECKPOINT_FILES:
        if (c / f).is_file():
            continue
        sharded = {"adapter_model.safetensors": "pytorch_model_fsdp_*", "optimizer.pt": "optimizer_*"}.get(f)
        if sharded and any(p.is_dir() for p in c.glob(sharded)):
            continue
        missing.append(f)
    if not any(c.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if "trainer_state.json" not in missing:
        try:
            step = loads((c / "trainer_state.json").read_text()).get("global_step")
        except (ValueError, OSError, AttributeError):  # cut off, not UTF-8, or not an object
            step = None
        if not isinstance(step, int) or isinstance(step, bool):
            missing.append("trainer_state.json (cut off, or not the Trainer's)")
    if "adapter_model.safetensors" not in missing and (c / "adapter_model.safetensors").is_file():
        why = safetensors_problem(c / "adapter_model.safetensors")
        if why:
            missing.append(f"adapter_model.safetensors ({why})")
    for f in ("optimizer.pt", "scheduler.pt"):
        if f not in missing and (c / f).is_file():
            why = torch_file_problem(c / f)
            if why:
                missing.append(f"{f} ({why})")
    return missing


def check_loads_as_tensors(c: Path) -> None:
    """The checkpoint's pickled files (optimizer, scheduler, RNG states) hold only what the Trainer's
    weights-only load accepts. Another file fails that load deep in the resume, with torch's advice to load it
    unsafely, which would run whatever code it carries: it is refused here, unloaded, before the model loads."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for f in sorted(p for p in c.iterdir() if p.suffix in (".pt", ".pth") and p.is_file()):
        with safe_globals():  # the numpy types the Trainer allows for the RNG states
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
            except (ValueError, RuntimeError, OSError) as e:
                unsafe = [f"(unreadable: {str(e)[:60]})"]
        if unsafe:
            raise UserError(
                f"--resume: '{f}' is not a file this project wrote: it holds {', '.join(unsafe[:3])}, which only an "
                f"unsafe load (one that can run code) would read; it was not loaded. Move '{c}' out of the run to "
                "resume from an older checkpoint, or start a new run in another paths.output_dir"
            )


def checkpoint_step(c: Path) -> int:
    tail = c.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints that hold every file a resume needs, oldest first; cut-off ones are skipped loudly."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for c in sorted(ckpt_dir.glob("checkpoint-*"), key=checkpoint_step):
        missing = checkpoint_missing(c)
        if missing:
            log.warning(
                "skipping incomplete checkpoint %s (missing or cut off: %s); an older complete one is used",
                c,
                ", ".join(missing),
            )
            continue
        out.append(c)
    return out


def trained_step(c: Path) -> int:
    return int(loads((c / "trainer_state.json").read_text())["global_step"])
