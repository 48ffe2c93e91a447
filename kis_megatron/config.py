"""Run configuration: nested dataclass sections, loaded from YAML plus dotted overrides.

``load_config("run.yaml", ["train.steps=100", "model.preset=tiny"])`` merges, in order,
the section defaults, the model preset named by ``model.preset``, the YAML file and the
command-line overrides, then validates strictly: an unknown key or a value of the wrong type
is a ``ConfigError`` that names the key. Each part of the trainer receives only its section.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from kis_megatron.errors import KisError
from kis_megatron.model.presets import PRESETS
from kis_megatron.utils import atomic_write_text


class ConfigError(KisError, ValueError):
    """A configuration the user must fix; the message names the offending key."""


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # fills the size fields below; explicit keys still win
    vocab_size: int = 32000
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (plain multi-head attention)
    ffn_dim: Optional[int] = None  # None = Llama rule: 2/3 * 4 * dim, rounded up to 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    kernels: bool = True  # fused ops (Triton on CUDA); False = plain PyTorch everywhere
    init_from: Optional[str] = None  # "hf:DIR": start from a Hugging Face Llama checkpoint


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    sp: bool = False  # sequence parallelism: norms and residuals split along the sequence
    pp_layers: list[int] = field(default_factory=list)  # layers per (virtual) stage; [] = even
    zero1: bool = False  # shard AdamW's state across data-parallel ranks (ZeRO stage 1)
    timeout_s: int = 600  # longest wait on a collective before a rank gives up (a dead peer)


@dataclass
class DataConfig:
    train: Optional[str] = None  # shard prefix (path without .bin/.idx) of the general stream
    valid: Optional[str] = None  # shard prefix for validation loss; None = no validation loss
    tokenizer: Optional[str] = None  # sentencepiece .model; checked against the shards
    seq_len: int = 256


@dataclass
class DomainSourceConfig:
    name: str = "domain"
    path: str = ""
    ratio: float = 0.0


@dataclass
class InfusionConfig:
    ratio: float = 0.0  # fraction of training tokens drawn from `domain`
    domain: Optional[str] = None  # shard prefix of the domain stream
    domains: list[DomainSourceConfig] = field(default_factory=list)  # several domains
    schedule: str = "constant"  # constant | window | steps
    window_start: float = 0.0  # fractions of training, for schedule=window
    window_end: float = 1.0
    ratio_steps: dict[int, float] = field(default_factory=dict)  # step -> ratio, schedule=steps
    repeat: bool = True  # let the domain source repeat when the ratio asks for more tokens
    kind: str = "ratio"  # which knob a study varies: ratio | domain_facts | exposures | ...
    # The knob's value, for the law tools; default: `facts` when kind is domain_facts and
    # facts is set, else the ratio.
    value: Optional[float] = None
    # Infuse only the first `facts` facts of `domain` (its documents labelled 0..facts-1 by
    # --doc-key fact_id) at the same ratio; None = every fact. Probes named `domain` follow.
    facts: Optional[int] = None


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 32  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 8  # sequences per forward/backward on one rank
    seed: int = 1234
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_frac: float = 0.2  # WSD: fraction of steps spent in the final decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # Steps whose loss or gradient norm is not finite that may be skipped (no update) before
    # the run stops as diverged; 0 = stop at the first one.
    skip_nonfinite_steps: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default
    stop_after: int = 0  # end this job after that step (checkpointed), e.g. under a time limit
    compile: bool = False  # torch.compile each transformer block (torchtitan's per-block style)
    recompute: str = "none"  # activations recomputed in backward: none | selective | full


@dataclass
class EvalConfig:
    interval: int = 0  # steps between evaluations; 0 = only at the end
    val_batches: int = 4  # micro-batches of validation loss
    probes: dict[str, str] = field(default_factory=dict)  # name -> probe file (general, domain)
    probe_style: str = "recall"  # which style `retention/*` reports: recall | heldout
    probe_batch: int = 64
    exact_match: bool = False  # also greedy generation exact match (slower)
    max_probes: int = 0  # at most this many facts per probe set (fixed hash ranking); 0 = all


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 2  # keep the last K checkpoints
    resume: str = "none"  # none | auto | path to a checkpoint directory
    save_final: bool = True


@dataclass
class LogConfig:
    dir: str = "runs/default"  # the run directory
    interval: int = 10  # steps between plain progress lines and metrics lines
    tensorboard: bool = True
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    infusion: InfusionConfig = field(default_factory=InfusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- loading


def load_config(path: Optional[str | Path] = None, overrides: list[str] = ()) -> Config:
    """Defaults <- model preset <- YAML file <- dotted overrides, validated."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    raw = _with_preset(raw)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    inf = cfg.infusion
    if inf.kind == "domain_facts" and inf.value is None and inf.facts is not None:
        inf.value = float(inf.facts)  # the knob's value for the law tools (run.json)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = text


def _with_preset(raw: dict) -> dict:
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("model: must be a mapping")
    name = model.get("preset")
    if name is None:
        return raw
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    merged = dict(PRESETS[name])
    merged.update(model)
    return {**raw, "model": merged}


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}{key}"
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(ktp, k, f"{key}.{k}"): _coerce(vtp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf / .nan / "nan": no setting means that
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a field type this loader does not know is a bug here
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Checks of values that types alone cannot catch; each names its key."""
    m, t = cfg.model, cfg.train
    for k in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
        _check(getattr(m, k) > 0, f"model.{k}", "must be positive")
    kv = m.n_kv_heads or m.n_heads
    _check(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by n_heads={m.n_heads}")
    _check((m.dim // m.n_heads) % 2 == 0, "model.dim", "head dim (dim / n_heads) must be even for RoPE")
    _check(kv > 0 and m.n_heads % kv == 0, "model.n_kv_heads",
           f"n_heads={m.n_heads} must be a multiple of n_kv_heads={kv}")
    for k in ("tp", "pp", "vpp", "timeout_s"):
        _check(getattr(cfg.parallel, k) >= 1, f"parallel.{k}", "must be >= 1")
    _validate_layout(cfg)
    _check(cfg.data.seq_len > 0, "data.seq_len", "must be positive")
    _check(cfg.data.seq_len <= m.max_seq_len, "data.seq_len",
           f"{cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(t.steps > 0, "train.steps", "must be positive")
    _check(t.micro_batch > 0, "train.micro_batch", "must be positive")
    _check(t.global_batch > 0 and t.global_batch % t.micro_batch == 0, "train.global_batch",
           f"{t.global_batch} must be a positive multiple of train.micro_batch={t.micro_batch}")
    _check(t.lr > 0, "train.lr", f"{t.lr} must be > 0")
    _check(0 <= t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} must be in [0, train.lr={t.lr}]")
    _check(0 <= t.warmup_steps, "train.warmup_steps", "must be >= 0")
    _check(t.schedule in ("cosine", "wsd", "constant"), "train.schedule",
           f"{t.schedule!r} is not one of cosine, wsd, constant")
    _check(0 < t.decay_frac <= 1, "train.decay_frac", "must be in (0, 1]")
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    _check(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", "must be auto, fp32 or bf16")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    _check(t.recompute in ("none", "selective", "full"), "train.recompute",
           f"{t.recompute!r} is not one of none, selective (the attention core), full (each block)")
    _check(0 <= t.stop_after, "train.stop_after", "must be >= 0 (0 = run to train.steps)")
    _check(0 <= t.skip_nonfinite_steps, "train.skip_nonfinite_steps", "must be >= 0")
    _check(0 <= cfg.infusion.ratio < 1, "infusion.ratio", f"{cfg.infusion.ratio} is outside [0, 1)")
    _check(cfg.infusion.schedule in ("constant", "window", "steps"), "infusion.schedule",
           f"{cfg.infusion.schedule!r} is not one of constant, window, steps")
    _validate_facts(cfg.infusion)
    _check(cfg.eval.interval >= 0, "eval.interval", "must be >= 0")
    _check(cfg.eval.max_probes >= 0, "eval.max_probes", "must be >= 0 (0 = every probe)")
    _check(cfg.eval.probe_style in ("recall", "heldout"), "eval.probe_style", "must be recall or heldout")
    _check(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.log.interval >= 1, "log.interval", "must be >= 1")
    _check(cfg.log.progress in ("auto", "bar", "lines", "none"), "log.progress",
           "must be auto, bar, lines or none")


# Keys a resumed run may set differently from its run directory's config.yaml: they change
# how the run is executed, checkpointed, logged or evaluated from here on, not which model
# is trained on which data. Left out on purpose: train.lr, min_lr, warmup_steps, schedule,
# decay_frac (the scheduler state restored from the checkpoint would silently ignore a new
# lr), every model size, data and infusion key, train.seed and global_batch (another
# stream), eval.probes, probe_style and val_batches (the run's metrics would change meaning).
RESUMABLE_KEYS = (
    "train.steps",  # longer or shorter: the lr schedule follows the new total from here on
    "train.stop_after", "train.skip_nonfinite_steps", "train.micro_batch",  # same global batch
    "train.device", "train.dtype", "train.threads", "train.compile", "train.recompute",
    "parallel.*",  # any layout resumes any checkpoint (full tensors under one naming)
    "checkpoint.*", "log.*",
    "eval.interval", "eval.probe_batch", "eval.exact_match",
    "model.preset", "model.kernels", "model.init_from",  # the sizes themselves are compared
)


def resume_conflicts(saved: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every setting of ``cfg`` that differs from the
    run's ``saved`` config and is not in RESUMABLE_KEYS."""
    old, out = saved.to_dict(), []
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if value != old[section][name] and key not in RESUMABLE_KEYS \
                    and f"{section}.*" not in RESUMABLE_KEYS:
                out.append((key, old[section][name], value))
    return out


def _validate_facts(inf: InfusionConfig) -> None:
    """infusion.facts: the checks that need no shard (those are in infusion.stream)."""
    if inf.facts is None:
        return
    _check(inf.facts >= 1, "infusion.facts", f"{inf.facts} must be >= 1 (or unset for every fact)")
    _check(not inf.domains, "infusion.facts",
           "applies to one infusion.domain; it cannot be used with infusion.domains")
    _check(bool(inf.domain), "infusion.facts",
           "needs infusion.domain (the shard whose facts it counts)")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _validate_layout(cfg: Config) -> None:
    """The parallel layout's checks that need no world size (those are in ParallelDims)."""
    par, m = cfg.parallel, cfg.model
    stages = par.pp * par.vpp
    _check(par.vpp == 1 or par.pp > 1, "parallel.vpp", "virtual stages need parallel.pp > 1")
    if par.pp_layers:
        _check(len(par.pp_layers) == stages, "parallel.pp_layers",
               f"has {len(par.pp_layers)} entries; it needs one per stage, pp * vpp = {stages}")
        _check(min(par.pp_layers) >= 1 and sum(par.pp_layers) == m.n_layers, "parallel.pp_layers",
               f"{par.pp_layers} must give every stage >= 1 layer and sum to model.n_layers={m.n_layers}")
    else:
        _check(stages <= m.n_layers, "parallel.pp",
               f"pp * vpp = {stages} stages, but the model has only n_layers={m.n_layers}")
    _check(not par.sp or cfg.data.seq_len % par.tp == 0, "data.seq_len",
           f"{cfg.data.seq_len} must be divisible by parallel.tp={par.tp} with parallel.sp=true")
