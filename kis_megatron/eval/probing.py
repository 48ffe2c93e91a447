"""Retention probes during training and on saved checkpoints: the glue between the model,
the tokenizer and ``kis_megatron.eval.retention`` (which knows nothing of either)."""

from __future__ import annotations

from pathlib import Path

import torch

from kis_megatron.config import Config, ConfigError
from kis_megatron.eval.retention import evaluate_retention, load_probes, select_probes


class ProbeRunner:
    """Scores the probe files of ``eval.probes`` ({name: path}) with a model: for the set
    named ``domain`` only facts below ``infusion.facts`` (when set), and at most
    ``eval.max_probes`` facts per set (``select_probes``; 0 = all)."""

    def __init__(self, cfg: Config, device: torch.device):
        from kis_megatron.data.tokenizer import Tokenizer

        if not cfg.data.tokenizer:
            raise ConfigError("eval.probes needs data.tokenizer to turn questions into tokens")
        self.tok = Tokenizer(cfg.data.tokenizer)
        self.cfg, self.device = cfg, device
        self.probes = {}
        for name, path in cfg.eval.probes.items():
            if not Path(path).is_file():
                raise ConfigError(f"eval.probes.{name}: probe file {path} not found")
            # The set named `domain` probes the infused facts: with infusion.facts, only those.
            below = cfg.infusion.facts if name == "domain" else None
            probes = select_probes(load_probes(path), cfg.eval.max_probes, below)
            if not probes:
                raise ConfigError(f"eval.probes.{name}: {path} has no probe of a fact below "
                                  f"infusion.facts={below}")
            self.probes[name] = probes

    @torch.no_grad()
    def run(self, model) -> dict:
        """``model(ids) -> logits``: the model, or a pipeline's forward through its stages."""

        def logprob_fn(ids: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(model(ids.to(self.device)).float(), dim=-1)

        ev = self.cfg.eval
        metrics = evaluate_retention(
            logprob_fn, self.tok.encode, self.probes,
            decode=self.tok.decode if ev.exact_match else None,
            batch_size=ev.probe_batch, pad_id=max(self.tok.pad_id, 0), device=self.device,
        )
        if ev.probe_style == "heldout":  # retention/* reports the style the config picks
            for name in self.probes:
                if f"retention_heldout/{name}" in metrics:
                    metrics[f"retention_recall/{name}"] = metrics[f"retention/{name}"]
                    metrics[f"retention/{name}"] = metrics[f"retention_heldout/{name}"]
        return metrics


def evaluate_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None,
                        probes: dict[str, str] | None = None, exact_match: bool = False,
                        device: str = "auto") -> dict:
    """Retention metrics of a saved checkpoint of a run, with the run's own config and
    tokenizer: the latest checkpoint unless one is named, the run's ``eval.probes`` unless
    other probe files are given (so any checkpoint can be scored on any fixed probe set)."""
    from kis_megatron.config import load_config
    from kis_megatron.model.llama import build_model
    from kis_megatron.train import resolve_device
    from kis_megatron.training.checkpoint import CheckpointError, CheckpointManager, verify

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if probes:
        cfg.eval.probes = dict(probes)
    if not cfg.eval.probes:
        raise ConfigError("no probe files: the run has no eval.probes; pass --probes name=path")
    cfg.eval.exact_match = exact_match
    path = Path(checkpoint) if checkpoint else CheckpointManager(run_dir / "checkpoints").latest()
    if path is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    verify(path, cfg.model)
    dev = resolve_device(device)
    model = build_model(cfg.model, seed=cfg.train.seed, device=dev)
    extra = CheckpointManager(path.parent).load(path, model, optimizer=None)
    model.eval()
    return {"step": extra["step"], "checkpoint": str(path), **ProbeRunner(cfg, dev).run(model)}
