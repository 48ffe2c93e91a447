"""The run directory (``log.dir``): the one writer and reader of its files.

    config.yaml     the fully resolved config, written when the run starts
    run.json        what the law tools and sweeps read: sizes, budget, the infusion the
                    blender realised, status (running | finished | stopped | interrupted |
                    failed), the error of a failed run, launch_dir
    metrics.jsonl   training and evaluation lines (written by training/logger.py)
    tb/             TensorBoard events with the same scalar tags
    checkpoints/    step_XXXXXXXX/ (complete when COMPLETE is in it) and ``latest``

Everyone else (the trainer, the sweeps, the law tools, export and evaluation) goes through
this module, so the layout and the resume policy are stated once.  It imports no torch: a
sweep asks for a run's status without loading the model code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import yaml

from kis_megatron.config import (RESUMABLE_KEYS, Config, ConfigError, load_config, resume_conflicts,
                                  save_config)
from kis_megatron.utils import atomic_write_json

CONFIG_FILE = "config.yaml"
INFO_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
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
        try:
            cfg = yaml.safe_load(self.config_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise error(f"{self.config_path} is not valid YAML: {e}") from None
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

    # ---------------------------------------------------------------- resume policy

    def resume_decision(self, cfg: Config, checkpoint: Optional[Path]) -> tuple[Optional[Path], bool]:
        """(the checkpoint to resume from, whether the run restarts afresh) for ``cfg``, given
        the ``checkpoint`` checkpoint.resume found (None: none). Refused before anything is
        built or written: a directory that holds another run (without resume=auto), a
        finished run with no checkpoint to continue, a resume whose settings differ from the
        run's own in a key that is not resumable."""
        if checkpoint is None and self.metrics_path.exists():
            if cfg.checkpoint.resume != "auto":
                raise ConfigError(f"log.dir={self.path} already holds a run; continue it with "
                                  "checkpoint.resume=auto or choose a new log.dir")
            if self.status() == "finished":  # never start a finished run over
                raise ConfigError(f"log.dir={self.path} holds a finished run and no checkpoint "
                                  "to continue from; choose a new log.dir")
            return None, True
        if checkpoint is not None:
            self._check_resumable(cfg)
        return checkpoint, False

    def _check_resumable(self, cfg: Config) -> None:
        """A resume never continues another model (nor rewrites the run's config.yaml to one)."""
        if not self.config_path.is_file():
            return
        try:
            saved = load_config(self.config_path)
        except ConfigError as e:
            raise ConfigError(f"cannot compare with the run's own settings: {e}") from None
        conflicts = resume_conflicts(saved, cfg)
        if conflicts:
            key, old, new = conflicts[0]
            raise ConfigError(
                f"{key}={new!r} differs from {key}={old!r} in {self.config_path}; a resumed run "
                f"may change only {', '.join(RESUMABLE_KEYS)}. Resume with the run's settings, "
                "or train in a new log.dir")
