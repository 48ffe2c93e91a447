"""Retention probes during training: the glue between the model, the tokenizer and
``kis_megatron.eval.retention`` (which knows nothing of either). Scoring a saved checkpoint
offline is ``tools/eval_retention.py``, on top of this."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kis_megatron.config import ConfigError, EvalConfig
from kis_megatron.data.tokenizer import Tokenizer
from kis_megatron.eval.retention import evaluate_retention, load_probes, select_probes


class ProbeRunner:
    """Scores the probe files of ``eval.probes`` ({name: path}) with a model: for the set
    named ``domain`` only facts below ``facts`` (``infusion.facts``, when set), and at most
    ``eval.max_probes`` facts per set (``select_probes``; 0 = all). ``tokenizer`` is
    ``data.tokenizer``, which turns the questions into tokens."""

    def __init__(self, ev: EvalConfig, tokenizer: Optional[str], device: torch.device,
                 facts: Optional[int] = None):
        if not tokenizer:
            raise ConfigError("eval.probes needs data.tokenizer to turn questions into tokens")
        self.tok = Tokenizer(tokenizer)
        self.ev, self.device = ev, device
        self.probes = {}
        for name, path in ev.probes.items():
            if not Path(path).is_file():
                raise ConfigError(f"eval.probes.{name}: probe file {path} not found")
            # The set named `domain` probes the infused facts: with infusion.facts, only those.
            below = facts if name == "domain" else None
            probes = select_probes(load_probes(path), ev.max_probes, below)
            if not probes:
                raise ConfigError(f"eval.probes.{name}: {path} has no probe of a fact below "
                                  f"infusion.facts={below}")
            self.probes[name] = probes

    @torch.no_grad()
    def run(self, model) -> dict:
        """``model(ids) -> logits``: the model, or a pipeline's forward through its stages."""

        def logprob_fn(ids: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(model(ids.to(self.device)).float(), dim=-1)

        ev = self.ev
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
