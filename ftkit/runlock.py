"""Who may write a run directory, and how a run is replaced without ever losing one.

- `RunLock`: an exclusive flock on <run>/.lock for as long as a stage writes the run. The kernel drops a
  flock when its process dies, however it dies, so a lock left by a killed process is free again and is
  simply taken over; the pid written in the file is only there to name the holder in the error.
- `check_replaceable`: --overwrite replaces only a folder that holds a run of this project and nothing
  else, never `.`, the working directory or one of its parents, the repository or the home folder.
- `start_run`: creates (or, with --overwrite, replaces) the run directory under the lock. The old run is
  moved aside and deleted only once the new run has a checkpoint; a new run that stops earlier gets the old
  one put back when its `with` block ends or, after a SIGKILL, by `recover_leftovers` on the next run.
- `recover_leftovers` / `clean_tmp_leftovers`: temporary files and folders of a killed stage
  (`.merged.tmp-PID`, `.x.gguf.tmp-PID`, ...) are reported and removed on that stage's next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
from pathlib import Path

from .cli import log
from .errors import UserError
from .jsonl import loads
from .paths import RunDir

LOCK_NAME = ".lock"
# What finetune.py, merge_adapter.py, evaluate.py and export_gguf.py put in a run directory (RunDir names
# them all). A folder that holds anything else is not only a run, so --overwrite refuses it.
RUN_ENTRIES = RunDir.entry_names() | {LOCK_NAME}
# The temporary siblings written by ftkit.paths.atomic_write_text / atomic_dir and by export_gguf.py.
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
CONFIG_MARK = "# resolved config"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


# What RunLock writes: "<pid> <stage>".
_HOLDER_RE = re.compile(r"^\d+ [\w.-]+$")


def open_lock_file(path: Path, flags: int) -> int:
    """A descriptor on the run's lock file, never through a symlink nor on anything but a regular file: the lock
    is truncated and written, and a link planted there would have that done to the file it points at."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(
                f"cannot open the run's lock '{path}' for writing ({e.strerror}); make it and its folder writable "
                "(chmod, or chattr -i for an immutable file), or set paths.output_dir to another folder"
            ) from None
        # ELOOP: a symlink (O_NOFOLLOW); EISDIR: a folder; ENXIO: a socket or a FIFO without a reader
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd is not None:
        os.close(fd)
    raise UserError(
        f"'{path}' is a symlink or not a regular file, so it cannot be the run's lock; it is left untouched: "
        "remove it or set paths.output_dir to a new folder"
    )


def _own_holder(path: Path) -> str:
    """The holder a stage wrote into the lock file ("unknown" when empty); the file is truncated when taken, so
    one holding anything else is the user's and is refused."""
    holder = _read_holder(path)
    if holder != "unknown" and not _HOLDER_RE.match(holder):
        raise UserError(
            f"'{path}' exists and was not written by this project (it holds other text); it is left untouched: "
            "move it away or set paths.output_dir to a new folder"
        )
    return holder


def _read_holder(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("utf-8", errors="replace").strip() or "unknown"  # a stage writes a line
    except OSError:
        return "unknown"


class RunLock:
    """An exclusive lock on a run directory; `what` (the stage) is written beside the pid for the error."""

    def __init__(self, root: Path, what: str):
        self.root, self.what, self.fd = Path(root), what, None

    @property
    def path(self) -> Path:
        return self.root / LOCK_NAME

    def acquire(self) -> "RunLock":
        fd = open_lock_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise UserError(
                f"run directory '{self.root}' is in use by another process (pid "
                f"{_holder_pid(self.path)}); wait for it to finish, or set paths.output_dir to "
                "another folder"
            ) from None
        try:
            previous = _own_holder(self.path)
        except UserError:
            os.close(fd)
            raise
        pid = previous.split()[0] if previous != "unknown" else ""
        if pid.isdigit() and int(pid) != os.getpid():
            # release() empties the file: a pid left in it is a holder that was killed. Its number may belong to
            # a new process by now, which does not hold the lock (the flock above was free).
            log.info(
                "taking over the lock of '%s' from pid %s, which %s",
                self.root,
                pid,
                "stopped without releasing it (the number now belongs to another process)"
                if pid_alive(int(pid))
                else "is no longer running (it stopped without releasing the lock)",
            )
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {self.what}\n".encode())
            os.fsync(fd)
        except OSError as e:  # a full disk: the error names the lock, which a bare descriptor's would not
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.fd = fd
        return self

    def release(self) -> None:
        # The file stays: unlinking it would let a third process lock a fresh file while a second one still
        # holds the old inode, and two writers would both think they own the run.
        if self.fd is not None:
            # Emptied, so that the next stage does not take an orderly end for a kill (see acquire).
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _holder_pid(lock_path: Path) -> str:
    holder = _read_holder(lock_path)
    return holder.split()[0] if holder != "unknown" else "unknown"


def check_unlocked(root: Path, writing: bool = True) -> None:
    """Fail early, before any work, when another process holds the run's lock, or (`writing`) when the lock
    could not be taken for lack of permission; takes nothing."""
    p = Path(root) / LOCK_NAME
    if not p.exists() and not p.is_symlink():
        return
    try:
        # Opened for writing only to learn whether it can be (an immutable or read-only lock would otherwise
        # fail after the model loaded); opening changes nothing in it.
        fd = open_lock_file(p, os.O_RDWR if writing else os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise UserError(
            f"run directory '{root}' is in use by another process (pid {_holder_pid(p)}); wait for "
            "it to finish, or set paths.output_dir to another folder"
        ) from None
    else:
        _own_holder(p)
    finally:
        os.close(fd)


def is_project_run(root: Path) -> bool:
    """A run of this project: its config.yaml was written by save_resolved_config."""
    cfg = Path(root) / "config.yaml"
    try:
        with open(cfg, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(CONFIG_MARK)
    except OSError:
        return False


def _is_run_entry(name: str, ours: frozenset[str] = RUN_ENTRIES) -> bool:
    if name in ours:
        return True
    m = _TMP_RE.match(name)
    return bool(m and m.group("name") in ours)


def protected_reason(root: Path) -> str | None:
    """Why a folder may never be deleted as a whole, or None."""
    from .paths import REPO_ROOT

    r = Path(root).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if r == cwd:
        return "it is the working directory"
    if r in cwd.parents:
        return "it holds the working directory"
    home = Path.home().resolve()
    if r == home or r in home.parents:
        return "it is the home folder or holds it"
    repo = REPO_ROOT.resolve()
    if r == repo or r in repo.parents:
        return "it holds this repository"
    if (r / ".git").exists():
        return "it is a git working copy"
    return None


def is_own_report(path: Path) -> bool:
    """A dataset_report.json that dataset.py or finetune.py wrote (ftkit.data.prepare's keys), not a file of the
    user's that has the same name."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        rep = loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(rep, dict) and {"rows_in_file", "train_rows", "length_histogram"} <= rep.keys()


# What a folder that is not (yet) a run may hold: dataset.py's report, and a lock left by a stage.
_BEFORE_RUN_ENTRIES = frozenset({LOCK_NAME, "dataset_report.json"})


def _foreign(root: Path) -> list[str]:
    """What in the folder no stage wrote. Names alone do not make a file ours: a folder without this
    project's config.yaml header is not a run, so its config.yaml, adapter/, dataset_report.json ... are the
    user's unless their content says otherwise."""
    if not root.is_dir():
        return []
    if is_project_run(root):
        return sorted(p.name for p in root.iterdir() if not _is_run_entry(p.name))
    return sorted(
        p.name
        for p in root.iterdir()
        if not _is_run_entry(p.name, _BEFORE_RUN_ENTRIES) or (p.name == "dataset_report.json" and not is_own_report(p))
    )


def _foreign_text(foreign: list[str]) -> str:
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return ", ".join(foreign[:3]) + more


def check_replaceable(root: Path) -> None:
    """--overwrite: the folder must hold a run of this project and nothing but that run (or nothing)."""
    root = Path(root)
    why = protected_reason(root)
    if why:
        raise UserError(
            f"--overwrite refuses to replace '{root}': {why}; set paths.output_dir to the run folder "
            "itself (e.g. runs/my-run)"
        )
    foreign = _foreign(root)
    if foreign and not is_project_run(root):
        raise UserError(
            f"--overwrite refuses to replace '{root}': it does not hold a run made by finetune.py but "
            f"{_foreign_text(foreign)}; set paths.output_dir to a new folder"
        )
    if foreign:
        raise UserError(
            f"--overwrite refuses to replace '{root}': besides the run it holds "
            f"{_foreign_text(foreign)}, which no stage wrote; move them out or set paths.output_dir "
            "to a new folder"
        )


def check_run_target(root: Path, overwrite: bool, resume: bool) -> None:
    """Before any work: nobody else writes the run, and a new run's folder holds nothing of the user's
    (its files would sit among the run's, and a same-named one would be replaced)."""
    root = Path(root)
    check_unlocked(root)
    if resume:
        return
    if overwrite:
        check_replaceable(root)
        return
    if foreign := _foreign(root):
        raise UserError(
            f"paths.output_dir '{root}' already holds {_foreign_text(foreign)}, which no stage wrote; "
            "a run needs a folder of its own: set paths.output_dir to a new folder"
        )


def has_progress(root: Path) -> bool:
    """The new run has something worth more than the old one: a checkpoint or a final adapter."""
    root = Path(root)
    if (root / "adapter" / "adapter_model.safetensors").is_file():
        return True
    ck = root / "checkpoints"
    return ck.is_dir() and any((c / "trainer_state.json").is_file() for c in ck.glob("checkpoint-*"))


def _aside_path(root: Path, pid: int) -> Path:
    return root.with_name(f".{root.name}.old-{pid}")


def _tree_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


class RunStart:
    """The run directory of a training run being written: locked, and the replaced run (if any) kept aside
    until the new one has a checkpoint. finetune.main holds it in a `with` block and hands it to the training
    callback that reports checkpoints; leaving the block (done, stopped, or an error) settles the folder and
    releases the lock, before the error line is printed. Processes other than the main one hold one without a
    lock (`RunStart.other_rank()`): only the main process writes the run directory."""

    def __init__(self, root: Path, lock: RunLock | None, aside: Path | None):
        self.root, self.lock, self.aside = root, lock, aside
        self.created = False

    @classmethod
    def other_rank(cls) -> "RunStart":
        return cls(Path("."), None, None)

    def __enter__(self) -> "RunStart":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def checkpoint_saved(self) -> None:
        """The new run can now be resumed: the replaced run is no longer needed."""
        if self.aside is not None and self.aside.exists():
            shutil.rmtree(self.aside, ignore_errors=True)
            log.info("--overwrite: removed the previous run (kept aside until the first checkpoint)")
        self.aside = None

    def finish(self) -> None:
        """At the end: without a checkpoint the new run is worth nothing; the old one goes back, or a folder
        this run created is removed, so a failed start leaves nothing behind."""
        if self.lock is None or self.lock.fd is None:
            return
        if self.aside is None or not self.aside.exists():
            if self.created and self.root.is_dir() and not has_progress(self.root) and not _foreign(self.root):
                shutil.rmtree(self.root, ignore_errors=True)
            self.lock.release()
            return
        if has_progress(self.root):
            self.checkpoint_saved()
        else:
            if self.root.exists():
                shutil.rmtree(self.root, ignore_errors=True)
            os.replace(self.aside, self.root)
            log.warning(
                "the new run stopped before its first checkpoint; the previous run in '%s' is restored", self.root
            )
            self.aside = None
        self.lock.release()


def start_run(root: Path, overwrite: bool, resume: bool = False, what: str = "finetune.py") -> RunStart:
    """Create the run directory and lock it until the returned RunStart is finished (use it in `with`); with
    `overwrite`, move the existing run aside first (check_replaceable must have passed). The checks done before
    the model was loaded are done again under the lock: another process may have started a run here since."""
    root = Path(root)
    aside = None
    created = not root.exists()
    if overwrite and not resume and root.is_dir() and is_project_run(root):
        check_replaceable(root)
        old = RunLock(root, what).acquire()  # nobody may be writing the run that is replaced
        aside = _aside_path(root, os.getpid())
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(root, aside)
        old.release()
        log.warning(
            "--overwrite: the previous run in '%s' is kept aside as '%s' until the new run's first checkpoint",
            root,
            aside.name,
        )
    root.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(root, what).acquire()
    except UserError as e:
        if aside is not None:
            # Another writer took the folder between our checks and our lock. Its lock file stays (see
            # release), so the folder cannot be emptied and the old run cannot go back: say where it is.
            try:
                root.rmdir()
                os.replace(aside, root)
            except OSError:
                raise UserError(f"{e}; the run it was to replace is kept at '{aside}'") from None
        raise
    if aside is None and not resume and is_project_run(root):
        lock.release()
        raise UserError(
            f"run directory '{root}' now holds a run that another process started after this one "
            "checked it; pass --resume to continue it, --overwrite to replace it, or set paths.output_dir "
            "to a new folder"
        )
    rs = RunStart(root, lock, aside)
    rs.created = created or aside is not None
    return rs


def recover_leftovers(root: Path) -> list[str]:
    """What a killed finetune.py left: a replaced run still aside (put back when the new run never reached a
    checkpoint, else removed) and temporary files inside the run. Returns what was done, also logged."""
    root = Path(root)
    check_unlocked(root)  # a live run's temporary files are not leftovers
    done = []
    parent = root.parent
    if parent.is_dir():
        for p in parent.glob(f".{root.name}.old-*"):
            m = _TMP_RE.match(p.name)
            if not m or pid_alive(int(m.group("pid"))):
                continue
            if root.exists() and has_progress(root):
                shutil.rmtree(p, ignore_errors=True)
                done.append(
                    f"removed '{p}', the previous run a killed --overwrite (pid {m.group('pid')}) had kept "
                    "aside; the new run had already checkpointed"
                )
            elif (
                not root.exists()
                or is_project_run(root)
                or not any(root.iterdir())
                or all(_is_run_entry(q.name) for q in root.iterdir())
            ):
                if root.exists():
                    shutil.rmtree(root)
                os.replace(p, root)
                done.append(
                    f"restored the previous run into '{root}' from '{p.name}': a killed --overwrite (pid "
                    f"{m.group('pid')}) had not reached its first checkpoint"
                )
            else:
                done.append(
                    f"'{p}' holds a previous run a killed --overwrite kept aside; '{root}' holds other files "
                    "now, so it was left for you to move back"
                )
    for line in done:
        log.warning("%s", line)
    if root.is_dir():
        done += clean_tmp_leftovers(root)
        done += clean_tmp_leftovers(root / "checkpoints", also=("tmp-checkpoint-",))
    return done


def clean_tmp_leftovers(folder: Path, names: tuple[str, ...] | None = None, also: tuple[str, ...] = ()) -> list[str]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` leftovers of dead processes in `folder` (only those of the
    given NAMEs when `names` is set), and entries starting with a prefix in `also` (temporary folders of
    libraries, e.g. the Trainer's tmp-checkpoint-N). Returns one line per removal, each also logged."""
    folder = Path(folder)
    out = []
    if not folder.is_dir():
        return out
    for p in folder.iterdir():
        m = _TMP_RE.match(p.name)
        stale = False
        if m and (names is None or m.group("name") in names) and not pid_alive(int(m.group("pid"))):
            stale = True
        elif also and p.name.startswith(also):
            stale = True  # callers hold (or checked) the run's lock: no live writer owns these
        if not stale:
            continue
        size = _tree_bytes(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        line = f"removed '{p}' ({size / 1e6:.1f} MB), left by a killed run"
        log.warning("%s", line)
        out.append(line)
    return out
