"""Retention probes during training and on saved checkpoints: the glue between the model,
the tokenizer and ``kis_megatron.eval.retention`` (which knows nothing of either)."""

from __future__ import annotations

from pathlib import Path

import torch

from kis_megatron.config import Config, ConfigError
from kis_megatron.eval.retention import evaluate_retention, load_probes


class ProbeRunner:
    """Scores the probe files of ``eval.probes`` ({name: path}) with a model."""

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
            self.probes[name] = load_probes(path)

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> dict:
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
