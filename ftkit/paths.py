"""The run directory: where each stage finds its inputs and puts its outputs, written so a crash never
leaves something that looks complete but is not.

    runs/<name>/config.yaml, plan.json, manifest.json, prompt_template.json, dataset_report.json,
                checkpoints/, adapter/, train_log.jsonl, run_summary.json, tensorboard/, merged/, eval/, export/
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .cli import log, redact
from .config import Config, load_config
from .errors import UserError
from .jsonl import loads

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def prompt_template(self) -> Path:
        return self.root / "prompt_template.json"

    @property
    def dataset_report(self) -> Path:
        return self.root / "dataset_report.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def completions(self) -> Path:
        """GRPO: the completions sampled at each logging step, with their rewards (one JSON object a line)."""
        return self.root / "completions.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "run_summary.json"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval_rows(self) -> Path:
        return self.root / "eval_rows.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @classmethod
    def entry_names(cls) -> frozenset[str]:
        """Every name a stage writes into a run directory (what --overwrite may replace)."""
        probe = cls(Path("."))
        return frozenset(getattr(probe, n).name for n, v in vars(cls).items() if isinstance(v, property))


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside the target, then rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # A fresh file, never through a link left at the temporary name: writing there would change its target.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write '{path}' ({e.strerror}); free disk space or fix the folder's permissions"
        ) from None


def atomic_write_json(path: Path, obj: Any) -> None:
    # Not redacted: what is saved is read back (config, prompt template, report); redaction is for display
    # (ftkit.cli.redact), and a HF_TOKEN that is also a word would rewrite that word in every saved file.
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_own_dir(target: Path, mark: str, stage: str) -> None:
    """A stage's output folder in a run (merged/, eval/, adapter/) is replaced only when a stage wrote it, which
    `mark`, a file it always writes inside, says. A file, a symlink or a folder without it is the user's."""
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_dir() or not (target / mark).is_file():
        kind = "a symlink" if target.is_symlink() else "a file" if not target.is_dir() else f"a folder without {mark}"
        raise UserError(
            f"'{target}' is {kind}, which {stage} did not write; it is left untouched: move it out of the run, "
            f"then run {stage} again"
        )


@contextlib.contextmanager
def atomic_dir(target: Path, mark: str | None = None, stage: str = "") -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one rename (with `mark`: only a
    `target` that check_own_dir finds ours).

    A crash leaves only a `.tmp` folder, which no stage reads, so a half-saved adapter or merged model
    can never be mistaken for a complete one.
    """
    if mark:
        check_own_dir(target, mark, stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()  # the link only, never what it points at
    elif tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_resolved_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, "# resolved config: exactly what ran\n" + cfg.to_yaml())


def check_latest_pointer(path: str | Path) -> None:
    """paths.latest is replaced by every run: it must be absent or a pointer written by write_latest (one
    line naming a folder), never a file of the user's that happens to sit there."""
    p = Path(path)
    if p.is_dir():
        raise UserError(
            f"paths.latest '{p}' is a folder; it must name a file (the pointer to the newest run), e.g. runs/latest"
        )
    if not p.is_file():
        return
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    lines = text.splitlines()
    if len(lines) != 1 or not Path(lines[0]).is_absolute() or p.stat().st_size > 4096:
        raise UserError(
            f"paths.latest '{p}' exists and is not a pointer written by finetune.py; it is left untouched: "
            "set paths.latest to another file, e.g. runs/latest"
        )


def write_latest(cfg: Config, run: RunDir) -> None:
    check_latest_pointer(cfg.paths.latest)
    atomic_write_text(Path(cfg.paths.latest), str(run.root.resolve()) + "\n")


def latest_run(pointer: str | Path = "runs/latest") -> RunDir:
    p = Path(pointer)
    if not p.is_file():
        raise UserError(f"no recent run found ('{p}' is missing); run finetune.py first or pass --config")
    root = Path(p.read_text(encoding="utf-8", errors="replace").strip())
    if not (root / "config.yaml").is_file():
        raise UserError(f"the most recent run '{root}' has no config.yaml; pass --config for the run to use")
    return RunDir(root)


def stage_config(config: str | None, overrides: Sequence[str]) -> tuple[Config, RunDir]:
    """Config for a stage after training: the given YAML, or else the most recent run's saved config.

    Later stages read the run's saved config rather than the original YAML, so that they see exactly
    what training used even if the YAML was edited since.
    """
    if config is None:
        # paths.latest=FILE on the command line names the pointer to follow (the last one given wins).
        pointers = [o.split("=", 1)[1] for o in overrides if o.startswith("paths.latest=")]
        run = latest_run(Path(pointers[-1]).expanduser() if pointers else "runs/latest")
        cfg = load_config(run.config, overrides)
        log.info("using the most recent run: %s", run.root)
        return cfg, run
    cfg = load_config(config, overrides)
    run = RunDir(Path(cfg.paths.output_dir))
    here = moved_run(config, cfg, overrides)
    moved = here is not None
    if moved:
        run = here
    if run.config.is_file():
        # The run's own config is the truth for model/data/template; CLI overrides still apply on top.
        saved = load_config(run.config, overrides)
        cfg = saved.model_copy(update={k: getattr(cfg, k) for k in ("merge", "inference")})
    if moved:
        cfg = at_run(cfg, run)
    return cfg, run


def moved_run(config: str | Path, cfg: Config, overrides: Sequence[str]) -> RunDir | None:
    """The run folder `config` sits in, when it is a run's saved config (config.yaml beside a manifest.json)
    naming another paths.output_dir and no override names one: after a move or copy (cp -a runs/r0 runs/r1),
    acting on the folder it names would write into (or fail on) another run. The folder it sits in is the run."""
    here = RunDir(Path(config).expanduser().parent)
    if (
        Path(config).name != here.config.name
        or not here.manifest.is_file()
        or here.root.resolve() == Path(cfg.paths.output_dir).expanduser().resolve()
        or any(o.startswith("paths.output_dir=") for o in overrides)
    ):
        return None
    log.warning(
        "'%s' is a run's saved config naming paths.output_dir '%s'; the run has moved: using '%s'",
        config,
        cfg.paths.output_dir,
        here.root,
    )
    return here


def at_run(cfg: Config, run: RunDir) -> Config:
    return cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"output_dir": str(run.root)})})


def load_run_config(config: str | Path, overrides: Sequence[str]) -> Config:
    """load_config, with a moved or copied run's saved config acting on the folder it sits in (moved_run)."""
    cfg = load_config(config, overrides)
    here = moved_run(config, cfg, overrides)
    return cfg if here is None else at_run(cfg, here)


def file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "liger-kernel",
        "gguf",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(cfg: Config, run: RunDir, data_hash: str | None, extra: dict | None = None) -> None:
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "data_sha256": data_hash,
        "seed": cfg.train.seed,
        "data_seed": cfg.data.seed,
        "command": redact(" ".join(sys.argv)),
        **(extra or {}),
    }
    atomic_write_json(run.manifest, manifest)


def check_writable(path: Path, key: str = "paths.output_dir") -> Path:
    """The nearest existing folder at or above `path`, after checking that a file can really be created there
    (`key` names the setting to change). Returns it."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"'{probe}' is a file, so '{path}' cannot be created; choose another {key}")
    writable = os.access(probe, os.W_OK)
    if writable:
        # os.access says yes to root everywhere, even on a read-only mount; a real file says the truth.
        try:
            import tempfile

            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError:
            writable = False
    if not writable:
        raise UserError(f"cannot write to '{probe}'; choose a writable {key}")
    return probe


def check_free_space(path: Path, need_bytes: int, what: str, key: str = "paths.output_dir") -> tuple[Path, int]:
    """Fail before hours of work when the disk cannot hold the result. Returns the existing folder that
    was checked and its free bytes, for callers that plan further writes there. `key`: the setting or flag that
    chose the place, named in the error."""
    probe = check_writable(path, key)
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise UserError(
            f"not enough disk space in '{probe}' for {what}: about {need_bytes / 1e9:.1f} GB needed, "
            f"{free / 1e9:.1f} GB free; free space or point {key} elsewhere"
        )
    return probe, free


# What a resumed run must share with the run it continues: another base, LoRA shape, data or prompt
# template would load a checkpoint into a different model or train it on different rows.
RESUME_KEYS = (
    "model.name_or_path",
    "model.revision",
    "lora.r",
    "lora.lora_alpha",
    "lora.target_modules",
    "lora.bias",
    "lora.use_rslora",
    "lora.use_dora",
    "lora.init_lora_weights",
    "lora.modules_to_save",
    "data.prompt_template",
    "data.system_prompt",
    "train.method",  # a run resumed under another method would mix two objectives in one adapter
    "data.format",
    "data.columns",
)


def local_data_hash(path) -> str | None:
    """The data hash the manifest records (ftkit.data.load_clean_split), for a local file or a list of local files
    (data.path entries); None when a hub id is among them."""
    if isinstance(path, list):
        parts = [local_data_hash(getattr(e, "path", e)) for e in path]
        return None if None in parts else combined_hash(parts)
    p = Path(path).expanduser()
    return file_sha256(p) if p.is_file() else None


def combined_hash(digests: list[str]) -> str:
    """One hash for several sources, in their order (a reordered list is another mix)."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def check_resume(cfg: Config, run: RunDir, newest_step: int | None) -> None:
    """Before anything is written: the run to resume was made with this model, LoRA shape, template and
    data, and has steps left to train. `newest_step`: the step of its newest complete checkpoint."""
    from .config import short_repr

    try:
        saved = load_config(run.config)
    except UserError as e:
        raise UserError(
            f"--resume: the run's saved config cannot be read ({e}); start a new run in another paths.output_dir"
        ) from None
    diffs = []
    for key in RESUME_KEYS:
        sec, leaf = key.split(".")
        old, new = getattr(getattr(saved, sec), leaf), getattr(getattr(cfg, sec), leaf)
        if old != new:
            diffs.append(f"{key} (saved {short_repr(old, 40)}, now {short_repr(new, 40)})")
    try:
        recorded = loads(run.manifest.read_text()).get("data_sha256") if run.manifest.is_file() else None
    except (OSError, ValueError):
        recorded = None
    now = local_data_hash(cfg.data.path)
    if recorded and now and recorded != now:
        diffs.append(f"the data in {cfg.data.path} (changed since the run started)")
    if diffs:
        raise UserError(
            f"--resume: the config differs from the run's saved one in {'; '.join(diffs)}; resume with "
            f"the saved config (python finetune.py --config {run.config} --resume) or start a new run "
            "in another paths.output_dir"
        )
    m = cfg.train.max_steps
    if newest_step is not None and m > 0 and newest_step >= m:
        raise UserError(
            f"--resume: the run in '{run.root}' already reached train.max_steps={m} (checkpoint at step "
            f"{newest_step}); raise train.max_steps to train further"
        )
