"""The run directory (``log.dir``): the one writer and reader of its files.

    config.yaml     the fully resolved config, written when the run starts
    run.json        what the law tools and sweeps read: sizes, budget, the infusion the
                    blender realised, status (running | finished | stopped | interrupted |
                    failed), the error of a failed run, launch_dir
    metrics.jsonl   training and evaluation lines (written by training/logger.py)
    tb/             TensorBoard events with the same scalar tags
    checkpoints/    step_XXXXXXXX/ (complete when COMPLETE is in it; each holds its run's
                    config.yaml too) and ``latest``
    .lock           who holds the directory (pid, host, start), while a run writes to it

One writer at a time: :meth:`RunDir.lock` takes an advisory lock on the directory, which
the operating system drops when the process ends, however it ends; a second kis-train on
the same ``log.dir`` fails at once and names the holder.

Everyone else (the trainer, the sweeps, the law tools, export and evaluation) goes through
this module, so the layout and the resume policy are stated once.  It imports no torch: a
sweep asks for a run's status without loading the model code.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import socket
from pathlib import Path
from typing import Optional

from kis_megatron.config import (RESUMABLE_KEYS, Config, ConfigError, load_config, resume_conflicts,
                                  save_config)
from kis_megatron.errors import StorageError
from kis_megatron.utils import atomic_write_json, atomic_write_text, read_yaml

CONFIG_FILE = "config.yaml"
INFO_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"
RUN_FILES = (CONFIG_FILE, INFO_FILE, METRICS_FILE, CHECKPOINTS, "tb")  # what a run writes
STEP_DIR = re.compile(r"^step_(\d{8})$")


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory (it has a run.json)."""
    return os.path.isfile(os.path.join(path, INFO_FILE))


def complete_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint directories (COMPLETE written last) in ``checkpoints_dir``,
    oldest first."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()),
                  key=lambda p: p.name)


def find_run_dirs_below(root: str | os.PathLike) -> list[str]:
    """The run directories at or below ``root``, sorted."""
    return sorted(r for r, _, files in os.walk(root) if INFO_FILE in files)


class RunDir:
    """One run directory; ``path`` need not exist yet."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    config_path = property(lambda self: self.path / CONFIG_FILE)
    info_path = property(lambda self: self.path / INFO_FILE)
    metrics_path = property(lambda self: self.path / METRICS_FILE)
    tb_dir = property(lambda self: self.path / "tb")
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------- run.json

    def info(self) -> dict:
        """run.json's content; {} when there is none or it cannot be read."""
        try:
            info = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def read_info(self, error: type[Exception]) -> dict:
        """run.json's content for the law tools: ``error`` when it cannot be read or lacks
        the keys a measurement needs."""
        path = self.info_path
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise error(f"cannot read {path}: {e}") from None
        inf = info.get("infusion") if isinstance(info, dict) else None
        if "model_params" not in info or not isinstance(inf, dict) or "value" not in inf:
            raise error(f"{path} needs 'model_params' and 'infusion': {{'kind', 'value'}}")
        return info

    def status(self) -> Optional[str]:
        return self.info().get("status")

    def write_info(self, info: dict) -> None:
        atomic_write_json(self.info_path, info)

    # ---------------------------------------------------------------- config.yaml

    def write_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_path)

    def saved_seed(self, error: type[Exception]):
        """train.seed of the saved config (None when there is no config.yaml), read without
        building a Config, so that runs of other frameworks with a plain YAML work too."""
        if not self.config_path.is_file():
            return None
        cfg = read_yaml(self.config_path, error, "the run's config") or {}
        train = cfg.get("train") if isinstance(cfg, dict) else None
        return train.get("seed") if isinstance(train, dict) else None

    def load_config(self) -> Config:
        """The run's config, for the tools that work on a finished run from anywhere:
        relative paths in it (shards, tokenizer, probe files, an ``hf:`` start) are made
        absolute against the directory the run was launched from (run.json ``launch_dir``;
        a run without it: the current directory)."""
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no {CONFIG_FILE})")
        cfg = load_config(self.config_path)
        base = self.info().get("launch_dir")
        if not isinstance(base, str) or not base:
            return cfg

        def at(p: Optional[str]) -> Optional[str]:
            return str(Path(base) / p) if p and not Path(p).is_absolute() else p

        d, inf = cfg.data, cfg.infusion
        d.train, d.valid, d.tokenizer = at(d.train), at(d.valid), at(d.tokenizer)
        inf.domain = at(inf.domain)
        for src in inf.domains:
            src.path = at(src.path)
        cfg.eval.probes = {name: at(p) for name, p in cfg.eval.probes.items()}
        if cfg.model.init_from and cfg.model.init_from.startswith("hf:"):
            cfg.model.init_from = "hf:" + at(cfg.model.init_from[3:])
        return cfg

    # ---------------------------------------------------------------- checkpoints and status

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoints_dir)

    def progress(self) -> str:
        """finished | failed (run.json says so) | partial (resumes from a complete checkpoint)
        | interrupted (started, no complete checkpoint: resumes afresh) | new."""
        status = self.status()
        if status in ("finished", "failed"):
            return status
        if self.complete_checkpoints():
            return "partial"
        if status is not None or self.metrics_path.exists():
            return "interrupted"
        return "new"

    # ---------------------------------------------------------------- one writer

    def lock(self) -> "RunLock":
        """Create the directory if needed and hold it for this process (see RunLock)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise StorageError(f"log.dir={path} is a file, not a directory; choose a directory")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"log.dir={path}: cannot create the run directory: "
                               f"{e.strerror}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"log.dir={path}: no permission to write in it")
        return RunLock(path, created)

    # ---------------------------------------------------------------- resume policy

    def resume_decision(self, cfg: Config, checkpoint: Optional[Path]) -> tuple[Optional[Path], bool]:
        """(the checkpoint to resume from, whether the run restarts afresh) for ``cfg``, given
        the ``checkpoint`` checkpoint.resume found (None: none). Refused before anything is
        built or written: a directory that holds files no run of this config wrote, another
        run (without resume=auto), a finished run with no checkpoint to continue, a resume
        without the run's saved settings or whose settings differ from them in a key that is
        not resumable, fewer steps than the checkpoint has done."""
        if checkpoint is not None:
            self._check_resumable(cfg, self._saved_config(checkpoint))
            done = _step_of(checkpoint)
            t = cfg.train
            if done is not None and t.steps < done:
                raise ConfigError(
                    f"train.steps={t.steps} is below step {done} of checkpoint {checkpoint}: a run "
                    f"cannot be shortened after it trained; keep train.steps >= {done}, or train in a new log.dir")
            if done is not None and 0 < t.stop_after <= done and t.stop_after < t.steps:
                raise ConfigError(f"train.stop_after={t.stop_after} is not after step {done} of checkpoint "
                                  f"{checkpoint}; raise it, or set 0 to run to train.steps")
            return checkpoint, False
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return None, False  # a new run
        started = self.info_path.is_file() or self.metrics_path.exists()
        if not started:  # e.g. the --config file itself, or checkpoints copied in
            raise ConfigError(f"log.dir={self.path} holds {', '.join(present)} but no run that kis-train "
                              "started there (no run.json or metrics.jsonl); nothing in it is replaced: "
                              "choose a new log.dir")
        if cfg.checkpoint.resume != "auto":
            raise ConfigError(f"log.dir={self.path} already holds a run; continue it with "
                              "checkpoint.resume=auto or choose a new log.dir")
        if self.status() == "finished":  # never start a finished run over
            raise ConfigError(f"log.dir={self.path} holds a finished run and no checkpoint "
                              "to continue from; choose a new log.dir")
        if self.config_path.is_file():  # an interrupted attempt of this run, not another run's
            self._check_resumable(cfg, self._load_saved(self.config_path))
        return None, True

    def _saved_config(self, checkpoint: Path) -> Config:
        """The settings ``checkpoint`` was trained with: the run's config.yaml, else the copy
        the checkpoint holds, else the config.yaml of the run directory it lies in."""
        for path in (self.config_path, Path(checkpoint) / CONFIG_FILE,
                     Path(checkpoint).parent.parent / CONFIG_FILE):
            if path.is_file():
                return self._load_saved(path)
        raise ConfigError(
            f"cannot resume from {checkpoint}: {self.config_path} is missing and the checkpoint holds "
            "no copy, so the settings it was trained with are unknown and a resume could continue "
            "another run; restore config.yaml, or train in a new log.dir")

    @staticmethod
    def _load_saved(path: Path) -> Config:
        try:
            return load_config(path)
        except ConfigError as e:
            raise ConfigError(f"cannot compare with the run's own settings: {e}") from None

    def _check_resumable(self, cfg: Config, saved: Config) -> None:
        """A resume never continues another model (nor rewrites the run's config.yaml to one)."""
        conflicts = resume_conflicts(saved, cfg)
        if conflicts:
            shown = "; ".join(f"{key}={new!r} differs from {key}={old!r}" for key, old, new in conflicts[:4])
            more = f" (and {len(conflicts) - 4} more)" if len(conflicts) > 4 else ""
            raise ConfigError(
                f"{shown}{more} in the run's settings ({self.config_path}); a resumed run "
                f"may change only {', '.join(RESUMABLE_KEYS)}. Resume with the run's settings, "
                "or train in a new log.dir")


def _step_of(checkpoint: Path) -> Optional[int]:
    m = STEP_DIR.match(Path(checkpoint).name)
    return int(m.group(1)) if m else None


class RunLock:
    """This process's hold on a run directory: an advisory ``flock`` on the directory
    itself (dropped by the kernel when the process ends, even on SIGKILL, so a lock is never
    stale), and ``.lock`` naming the holder for whoever is refused. Where the file system
    has no flock, ``.lock`` alone is the lock: a holder whose pid is gone on this host is
    stale and replaced; one on another host is reported, for a person to judge."""

    def __init__(self, path: Path, created: bool = False):
        self.path, self.file, self.created = path, path / LOCK_FILE, created
        self._fd: Optional[int] = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise self._held() from None
        except OSError as e:  # no flock here (some network file systems)
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
                raise
            holder = self._holder()
            if holder is not None and not _gone(holder):
                raise self._held() from None
            self.announce()  # the file is the lock

    def announce(self) -> None:
        """Name this process in ``.lock``: once the run is sure to write here (a refused
        run leaves the directory as it found it)."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(self.file, json.dumps(me) + "\n")

    def _holder(self) -> Optional[dict]:
        try:
            holder = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _held(self) -> ConfigError:
        h = self._holder() or {}
        who = (f"pid {h.get('pid')} on host {h.get('host')}, since {h.get('since')}" if h
               else "a process that is starting")
        return ConfigError(f"log.dir={self.path} is in use by another kis-train ({who}); two writers "
                           "would corrupt one run directory: wait for it to end, or choose another log.dir")

    def release(self) -> None:
        """Drop the hold (the process's end drops it too); a directory this lock created and
        nothing was written to is removed."""
        if self.file.is_file() and (self._holder() or {}).get("pid") == os.getpid():
            self.file.unlink(missing_ok=True)
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self.created:
            try:
                self.path.rmdir()  # only when empty
            except OSError:
                pass
            self.created = False


def _gone(holder: dict) -> bool:
    """Whether the holder of a file-only lock has ended (known only on this host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
