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
from kis_megatron.utils import atomic_write_text, read_yaml


class ConfigError(KisError, ValueError):
    """A configuration the user must fix; the message names the offending key."""


INFUSION_KINDS = ("ratio", "domain_facts", "custom")


def num(default, domain: str):
    """A numeric field and the values it may take, checked with its key's name by
    ``validate``: ``"> 0"``, ``">= 1"``, or an interval such as ``"[0, 1)"``. None (an
    optional field left unset) is always allowed."""
    _domain_test(domain)  # a malformed domain is a bug here, found at import
    return field(default=default, metadata={"domain": domain})


def choice(default: str, choices: tuple[str, ...]):
    """A string field that must be one of ``choices``."""
    return field(default=default, metadata={"choices": choices})


def _domain_test(domain: str):
    """A predicate for a domain string of ``num``."""
    d = domain.replace(" ", "")
    for op, test in ((">=", lambda v, b: v >= b), (">", lambda v, b: v > b)):
        if d.startswith(op):
            bound = float(d[len(op):])
            return lambda v: test(v, bound)
    if d[0] in "[(" and d[-1] in "])":
        lo, hi = map(float, d[1:-1].split(","))
        return lambda v: (v >= lo if d[0] == "[" else v > lo) and (v <= hi if d[-1] == "]" else v < hi)
    raise ValueError(f"malformed domain {domain!r}")


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # fills the size fields below; explicit keys still win
    vocab_size: int = num(32000, ">= 1")
    dim: int = num(256, ">= 1")
    n_layers: int = num(4, ">= 1")
    n_heads: int = num(4, ">= 1")
    n_kv_heads: Optional[int] = num(None, ">= 1")  # None = n_heads (plain multi-head attention)
    ffn_dim: Optional[int] = num(None, ">= 1")  # None = Llama rule: 2/3 * 4 * dim, rounded up to 64
    max_seq_len: int = num(2048, ">= 1")
    rope_theta: float = num(10000.0, "> 0")
    norm_eps: float = num(1e-5, "> 0")
    tie_embeddings: bool = False
    init_std: float = num(0.02, "> 0")
    kernels: bool = True  # fused ops (Triton on CUDA); False = plain PyTorch everywhere
    init_from: Optional[str] = None  # "hf:DIR": start from a Hugging Face Llama checkpoint


@dataclass
class ParallelConfig:
    tp: int = num(1, ">= 1")
    pp: int = num(1, ">= 1")
    vpp: int = num(1, ">= 1")  # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    sp: bool = False  # sequence parallelism: norms and residuals split along the sequence
    pp_layers: list[int] = field(default_factory=list)  # layers per (virtual) stage; [] = even
    zero1: bool = False  # shard AdamW's state across data-parallel ranks (ZeRO stage 1)
    timeout_s: int = num(600, ">= 1")  # longest wait on a collective before a rank gives up (a dead peer)


@dataclass
class DataConfig:
    train: Optional[str] = None  # shard prefix (path without .bin/.idx) of the general stream
    valid: Optional[str] = None  # shard prefix for validation loss; None = no validation loss
    tokenizer: Optional[str] = None  # sentencepiece .model; checked against the shards
    seq_len: int = num(256, ">= 1")


@dataclass
class DomainSourceConfig:
    name: str = "domain"
    path: str = ""
    ratio: float = num(0.0, "(0, 1)")


@dataclass
class InfusionConfig:
    ratio: float = num(0.0, "[0, 1)")  # fraction of training tokens drawn from `domain`
    domain: Optional[str] = None  # shard prefix of the domain stream
    domains: list[DomainSourceConfig] = field(default_factory=list)  # several domains
    schedule: str = choice("constant", ("constant", "window", "steps"))
    window_start: float = num(0.0, "[0, 1]")  # fractions of training, for schedule=window
    window_end: float = num(1.0, "[0, 1]")
    ratio_steps: dict[int, float] = field(default_factory=dict)  # step -> ratio, schedule=steps
    repeat: bool = True  # let the domain source repeat when the ratio asks for more tokens
    # Which knob a study varies, and so the infusion value run.json records for the law
    # tools: ratio (the domain ratio), domain_facts (the number of domain facts the blender
    # infuses: infusion.facts, or every fact of the shard), custom (a knob of your own, its
    # value given in infusion.value).
    kind: str = choice("ratio", INFUSION_KINDS)
    value: Optional[float] = None  # kind=custom: the knob's value; otherwise derived, leave unset
    # Infuse only the first `facts` facts of `domain` (its documents labelled 0..facts-1 by
    # --doc-key fact_id) at the same ratio; None = every fact. Probes named `domain` follow.
    facts: Optional[int] = num(None, ">= 1")


@dataclass
class ProfileConfig:
    start: int = num(0, ">= 0")  # first profiled step, counted from 1; 0 = no profiling
    steps: int = num(3, ">= 1")  # steps recorded from `start` on (training/profiling.py)


@dataclass
class TrainConfig:
    steps: int = num(1000, ">= 1")
    global_batch: int = num(32, ">= 1")  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = num(8, ">= 1")  # sequences per forward/backward on one rank
    seed: int = num(1234, "[0, 4294967295]")  # numpy's seeds are 32-bit unsigned
    lr: float = num(3e-4, "> 0")
    min_lr: float = num(3e-5, ">= 0")
    warmup_steps: int = num(100, ">= 0")
    schedule: str = choice("cosine", ("cosine", "wsd", "constant"))
    decay_frac: float = num(0.2, "(0, 1]")  # WSD: fraction of steps spent in the final decay
    weight_decay: float = num(0.1, ">= 0")
    beta1: float = num(0.9, "[0, 1)")
    beta2: float = num(0.95, "[0, 1)")
    eps: float = num(1e-8, "> 0")
    grad_clip: float = num(1.0, ">= 0")  # 0 disables clipping
    # Steps whose loss or gradient norm is not finite that may be skipped (no update) before
    # the run stops as diverged; 0 = stop at the first one.
    skip_nonfinite_steps: int = num(0, ">= 0")
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    dtype: str = choice("auto", ("auto", "fp32", "bf16"))  # auto: bf16 autocast on CUDA, fp32 on CPU
    threads: int = num(0, ">= 0")  # torch intra-op threads on CPU; 0 = leave torch's default
    stop_after: int = num(0, ">= 0")  # end this job after that step (checkpointed), e.g. under a time limit
    compile: bool = False  # torch.compile each transformer block (torchtitan's per-block style)
    # activations recomputed in backward: none | selective (the attention core) | full (each block)
    recompute: str = choice("none", ("none", "selective", "full"))
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # a torch.profiler trace of a few steps


@dataclass
class EvalConfig:
    interval: int = num(0, ">= 0")  # steps between evaluations; 0 = only at the end
    val_batches: int = num(4, ">= 1")  # micro-batches of validation loss (of data.valid)
    probes: dict[str, str] = field(default_factory=dict)  # name -> probe file (general, domain)
    probe_style: str = choice("recall", ("recall", "heldout"))  # which style `retention/*` reports
    probe_batch: int = num(64, ">= 1")
    exact_match: bool = False  # also greedy generation exact match (slower)
    max_probes: int = num(0, ">= 0")  # at most this many facts per probe set (fixed hash ranking); 0 = all


@dataclass
class CheckpointConfig:
    interval: int = num(0, ">= 0")  # steps between checkpoints; 0 = only at the end
    keep: int = num(2, ">= 1")  # keep the last K checkpoints
    resume: str = "none"  # none | auto | path to a checkpoint directory
    save_final: bool = True


@dataclass
class LogConfig:
    dir: str = "runs/default"  # the run directory
    interval: int = num(10, ">= 1")  # steps between plain progress lines and metrics lines
    tensorboard: bool = True
    progress: str = choice("auto", ("auto", "bar", "lines", "none"))  # auto: a bar on a terminal


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
        raw = read_yaml(path, ConfigError, "the config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    raw = _with_preset(raw)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
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


def check_fields(obj, prefix: str = "") -> None:
    """Every field's own domain (``num``) and choices (``choice``), in nested sections and
    lists of them too, each error naming the key and the value given."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_fields(item, f"{key}[{i}].")
        elif value is None:
            continue
        elif "domain" in f.metadata and not _domain_test(f.metadata["domain"])(value):
            domain = f.metadata["domain"]
            where = f"must be {domain}" if domain[0] in "<>" else f"must lie in {domain}"
            raise ConfigError(f"{key}={value!r}: {where}")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(f.metadata['choices'])}")


def validate(cfg: Config) -> None:
    """Each key's own domain (see the dataclasses), then the checks that relate keys; every
    message names its key."""
    check_fields(cfg)
    m, t = cfg.model, cfg.train
    kv = m.n_kv_heads or m.n_heads
    _check(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by n_heads={m.n_heads}")
    _check((m.dim // m.n_heads) % 2 == 0, "model.dim", "head dim (dim / n_heads) must be even for RoPE")
    _check(m.n_heads % kv == 0, "model.n_kv_heads",
           f"n_heads={m.n_heads} must be a multiple of n_kv_heads={kv}")
    _validate_layout(cfg)
    _check(cfg.data.seq_len <= m.max_seq_len, "data.seq_len",
           f"{cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(t.global_batch % t.micro_batch == 0, "train.global_batch",
           f"{t.global_batch} must be a multiple of train.micro_batch={t.micro_batch}")
    _check(t.profile.start <= t.steps, "train.profile.start",
           f"{t.profile.start} is after the last step (train.steps={t.steps}): nothing would be profiled")
    _check(t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} must be at most train.lr={t.lr}")
    _validate_infusion(cfg.infusion)


def _validate_infusion(inf: InfusionConfig) -> None:
    """Every infusion knob set must take effect, and none may contradict another, so that
    run.json records what the blender realises."""
    _check(not (inf.domain and inf.domains), "infusion.domains",
           "set either infusion.domain (one domain, its ratio infusion.ratio) or infusion.domains "
           "(several, each with its ratio), not both")
    if inf.domains:
        _check(inf.ratio == 0, "infusion.ratio",
               f"{inf.ratio} applies to infusion.domain; with infusion.domains each source has its ratio")
        names = [s.name for s in inf.domains]
        _check(len(set(names)) == len(names), "infusion.domains", f"names repeat: {names}")
        _check(all(s.path for s in inf.domains), "infusion.domains", "every source needs a path")
        _check(sum(s.ratio for s in inf.domains) < 1, "infusion.domains",
               f"the ratios sum to {sum(s.ratio for s in inf.domains):g}; they must sum below 1")
    s = inf.schedule
    _check(s == "window" or (inf.window_start, inf.window_end) == (0.0, 1.0), "infusion.window_start",
           f"infusion.window_start/window_end apply to infusion.schedule=window, not {s}")
    _check(s == "steps" or not inf.ratio_steps, "infusion.ratio_steps",
           f"applies to infusion.schedule=steps, not {s}")
    if s == "window":
        _check(inf.window_start < inf.window_end, "infusion.window_end",
               f"{inf.window_end} must be above infusion.window_start={inf.window_start}")
    if s == "steps":
        _check(bool(inf.ratio_steps), "infusion.ratio_steps", "schedule=steps needs step: ratio entries")
        for step, r in inf.ratio_steps.items():
            _check(step >= 0 and 0 <= r < 1, f"infusion.ratio_steps.{step}",
                   f"{r}: steps must be >= 0 and ratios in [0, 1)")
    trains_domain = inf.ratio > 0 or (s == "steps" and any(r > 0 for r in inf.ratio_steps.values()))
    _validate_facts(inf, trains_domain)
    if inf.domain:
        _check(trains_domain, "infusion.domain",
               f"is set but infusion.ratio={inf.ratio}: no domain token would be trained; set "
               "infusion.ratio > 0, or leave infusion.domain unset")
    if inf.kind == "ratio":
        _check(inf.value is None or inf.value == infusion_value(inf), "infusion.value",
               f"{inf.value} contradicts infusion.kind=ratio, whose value is the domain ratio "
               f"({infusion_value(inf):g}); leave infusion.value unset, or set infusion.kind=custom "
               "for a knob of your own")
    elif inf.kind == "domain_facts":
        _check(bool(inf.domain), "infusion.kind",
               "domain_facts counts the facts of one infusion.domain; set infusion.domain")
        _check(inf.value is None or inf.facts is None or inf.value == inf.facts, "infusion.value",
               f"{inf.value} contradicts infusion.facts={inf.facts}, the number of facts infused; "
               "leave infusion.value unset")
    else:
        _check(inf.value is not None, "infusion.value",
               "infusion.kind=custom records the value of your own knob: set infusion.value")


def infusion_value(inf: InfusionConfig) -> Optional[float]:
    """The infusion value run.json records, as far as the config alone determines it: the
    ratio (the sum over infusion.domains) for kind=ratio, infusion.facts (or a given value)
    for kind=domain_facts (None: every fact of the shard, counted by the blender),
    infusion.value for kind=custom."""
    if inf.kind == "ratio":
        return float(sum(s.ratio for s in inf.domains) if inf.domains else inf.ratio)
    if inf.kind == "domain_facts":
        return float(inf.facts) if inf.facts is not None else inf.value
    return inf.value


# Keys a resumed run may set differently from its run directory's config.yaml: they change
# how the run is executed, checkpointed, logged or evaluated from here on, not which model
# is trained on which data. Left out on purpose: train.lr, min_lr, warmup_steps, schedule,
# decay_frac (the scheduler state restored from the checkpoint would silently ignore a new
# lr), every model size, data and infusion key, train.seed and global_batch (another
# stream), eval.probes, probe_style and val_batches (the run's metrics would change meaning).
RESUMABLE_KEYS = (
    "train.steps",  # longer or shorter: the lr schedule follows the new total from here on
    "train.stop_after", "train.skip_nonfinite_steps", "train.micro_batch",  # same global batch
    "train.device", "train.dtype", "train.threads", "train.compile", "train.recompute", "train.profile",
    "parallel.*",  # any layout resumes any checkpoint (full tensors under one naming)
    "checkpoint.*", "log.*",
    "eval.interval", "eval.probe_batch", "eval.exact_match",
    "model.preset", "model.kernels", "model.init_from",  # the sizes themselves are compared
)


def resume_conflicts(saved: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every setting of ``cfg`` that differs from the
    run's ``saved`` config and is not in RESUMABLE_KEYS."""
    old, out = _canonical(saved.to_dict()), []
    for section, values in _canonical(cfg.to_dict()).items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if value != old[section][name] and key not in RESUMABLE_KEYS \
                    and f"{section}.*" not in RESUMABLE_KEYS:
                out.append((key, old[section][name], value))
    return out


def _canonical(d: dict) -> dict:
    """A config as resume compares it: before 2026-12-04 a domain_facts run saved its
    infusion.facts as infusion.value too, which is now left unset."""
    inf = d["infusion"]
    if inf["kind"] == "domain_facts" and inf["value"] is not None and inf["value"] == inf["facts"]:
        d["infusion"] = {**inf, "value": None}
    return d


def config_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML text (config.yaml's content)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _validate_facts(inf: InfusionConfig, trains_domain: bool) -> None:
    """infusion.facts: the checks that need no shard (those are in infusion.stream)."""
    if inf.facts is None:
        return
    _check(not inf.domains, "infusion.facts",
           "applies to one infusion.domain; it cannot be used with infusion.domains")
    _check(bool(inf.domain), "infusion.facts",
           "needs infusion.domain (the shard whose facts it counts)")
    _check(trains_domain, "infusion.facts",
           f"{inf.facts} has no effect with infusion.ratio={inf.ratio}: no domain token is trained")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    atomic_write_text(path, config_yaml(cfg))


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
