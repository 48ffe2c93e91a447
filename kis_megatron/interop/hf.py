"""Hugging Face interoperability: our checkpoints as ``LlamaForCausalLM`` folders and back.

Our model is a Llama: the same pre-norm blocks, RMSNorm, SwiGLU, grouped-query attention and
"rotate half" RoPE (the first half of each head's dimensions pairs with the second half, which
is also how HF's ``LlamaAttention`` applies ``rotate_half``), so the weights map one to one
with no permutation of q/k rows; ``tests/interop`` proves it by comparing logits.

    ours                                   Hugging Face
    tok_embeddings.weight                  model.embed_tokens.weight
    layers.{i}.attn_norm.weight            model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.w{q,k,v,o}.weight      model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.ffn_norm.weight             model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.ffn.w_{gate,up,down}.weight model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight (absent when tie_word_embeddings)

Whatever one side can express and the other cannot (RoPE scaling, biases, another activation,
a head_dim that is not hidden/heads, ...) is an ``InteropError`` naming the field, never a
silent difference. Checkpoints of any (dp, tp, pp) layout export (they hold full tensors);
an imported model can be trained at any layout: the trainer cuts the model first (pipeline
stage and ``apply_tp``, on the meta device) and ``load_init`` then copies into each parameter
the part of the full tensor it holds (``local_slice``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from kis_megatron.config import ConfigError, ModelConfig
from kis_megatron.interop.hf_tokenizer import write_hf_tokenizer
from kis_megatron.model.llama import Transformer, llama_ffn_dim, on_meta_device
from kis_megatron.parallel.parallelize import build_model, local_slice
from kis_megatron.training.checkpoint import CheckpointError, CheckpointManager, verify
from kis_megatron.run_dir import RunDir
from kis_megatron.utils import refuse_to_replace, staging_dir

__all__ = ["InteropError", "export_hf", "import_hf", "load_init", "hf_config_from_model",
           "model_fields_from_hf_config", "to_hf_state_dict", "from_hf_state_dict", "parse_size"]


class InteropError(ConfigError):
    """A checkpoint or config that cannot cross between our format and Hugging Face's."""


_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn.w_gate": "mlp.gate_proj",
    "ffn.w_up": "mlp.up_proj",
    "ffn.w_down": "mlp.down_proj",
}
_TOP_MAP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
# Buffers some older HF checkpoints saved; recomputed by the model, so safe to drop.
_HF_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------- names


def to_hf_state_dict(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our parameter names -> HF ``LlamaForCausalLM`` names (the tied head is left out)."""
    out = {}
    for name, t in state.items():
        if tied and name == "output.weight":
            continue
        m = _OURS_LAYER.match(name)
        if m and m.group(2) in _LAYER_MAP:
            out[f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"] = t
        elif name.endswith(".weight") and name[:-7] in _TOP_MAP:
            out[f"{_TOP_MAP[name[:-7]]}.weight"] = t
        else:
            raise InteropError(f"parameter {name!r} has no Hugging Face Llama counterpart")
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` names -> ours; a tied model gets ``output.weight`` = embedding."""
    back_layer = {v: k for k, v in _LAYER_MAP.items()}
    back_top = {v: k for k, v in _TOP_MAP.items()}
    out = {}
    for name, t in hf.items():
        if _HF_IGNORED.search(name):
            continue
        m = _HF_LAYER.match(name)
        if m and m.group(2) in back_layer:
            out[f"layers.{m.group(1)}.{back_layer[m.group(2)]}.weight"] = t
        elif name.endswith(".weight") and name[:-7] in back_top:
            if tied and name == "lm_head.weight":
                continue  # a tied checkpoint may still carry the head; the embedding wins
            out[f"{back_top[name[:-7]]}.weight"] = t
        else:
            raise InteropError(f"tensor {name!r} is not part of a Llama model this framework "
                               "can hold (biases and other extras are not supported)")
    if tied:
        if "tok_embeddings.weight" not in out:
            raise InteropError("the checkpoint has no model.embed_tokens.weight")
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ---------------------------------------------------------------------------- configs


def hf_config_from_model(cfg: ModelConfig, special_ids: Optional[dict] = None) -> dict:
    """The ``config.json`` of ``LlamaForCausalLM`` for our model config. RoPE theta is written
    both as ``rope_parameters`` (transformers 5) and ``rope_theta`` (transformers 4)."""
    kv = cfg.n_kv_heads or cfg.n_heads

    ids = special_ids or {}
    theta = float(cfg.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim or llama_ffn_dim(cfg.dim),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": kv,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": float(cfg.norm_eps),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "initializer_range": float(cfg.init_std),
        "bos_token_id": ids.get("bos", 1) if ids.get("bos", 1) >= 0 else None,
        "eos_token_id": ids.get("eos", 2) if ids.get("eos", 2) >= 0 else None,
        "pad_token_id": ids.get("pad", -1) if ids.get("pad", -1) >= 0 else None,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _rope_theta(hf: dict) -> float:
    """RoPE theta from a v4 (``rope_theta``/``rope_scaling``) or v5 (``rope_parameters``)
    config; any scaling or partial rotary embedding is refused."""
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters") or {}
    for source, spec in (("rope_scaling", scaling), ("rope_parameters", params)):
        if not spec:
            continue
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise InteropError(f"{source}: RoPE type {kind!r} is not supported (this model has "
                               "plain RoPE only; no linear/dynamic/yarn/llama3 scaling)")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise InteropError("partial_rotary_factor: only full rotary embeddings (1.0) are supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields_from_hf_config(hf: dict) -> dict:
    """Our ``ModelConfig`` fields for an HF Llama ``config.json``; refuses what we cannot run."""
    if hf.get("model_type") != "llama":
        raise InteropError(f"model_type is {hf.get('model_type')!r}; only 'llama' can be imported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise InteropError(f"{key}: expected a positive integer, got {hf.get(key)!r}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise InteropError(f"hidden_act={act!r} is not supported (SwiGLU uses silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise InteropError(f"{key}=true is not supported (this model has no biases)")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    if dim % heads:
        raise InteropError(f"hidden_size={dim} is not divisible by num_attention_heads={heads}")
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim != dim // heads:
        raise InteropError(f"head_dim={head_dim} differs from hidden_size/num_attention_heads="
                           f"{dim // heads}; this model derives head_dim from them")
    if head_dim % 2:
        raise InteropError(f"head_dim={head_dim} must be even for RoPE")
    if heads % kv:
        raise InteropError(f"num_attention_heads={heads} is not a multiple of "
                           f"num_key_value_heads={kv}")
    return {
        "vocab_size": hf["vocab_size"],
        "dim": dim,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv,
        "ffn_dim": hf["intermediate_size"],
        "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


# ---------------------------------------------------------------------------- export


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB``/``500MB``/``2GiB``/``1000`` (HF convention: GB = 1e9, GiB = 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise InteropError(f"max_shard_size: cannot read {size!r}; use e.g. 5GB, 500MB or bytes")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise InteropError(f"max_shard_size must be positive, got {size!r}")
    return n


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> int:
    """One ``model.safetensors``, or HF-style shards plus ``model.safetensors.index.json``
    when the weights exceed ``max_bytes``; returns the number of files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return 1
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def _locate(run_dir_or_checkpoint: str | Path, checkpoint: Optional[str | Path]):
    """(run dir, checkpoint dir) from a run dir, or from a checkpoint dir inside one."""
    path = Path(run_dir_or_checkpoint)
    if RunDir(path).config_path.is_file():
        run_dir = path
    elif (path / "COMPLETE").is_file() and RunDir(path.parent.parent).config_path.is_file():
        run_dir, checkpoint = path.parent.parent, checkpoint or path
    else:
        raise InteropError(f"{path} is neither a run directory (no config.yaml) nor a "
                           "checkpoint directory inside one")
    ckpts = RunDir(run_dir).checkpoints_dir
    ckpt = Path(checkpoint) if checkpoint else CheckpointManager(ckpts).latest()
    if ckpt is None:
        raise CheckpointError(f"{ckpts} holds no complete checkpoint")
    if not (ckpt / "COMPLETE").is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint directory")
    return run_dir, ckpt


def export_hf(run_dir_or_checkpoint: str | Path, out_dir: str | Path,
              checkpoint: Optional[str | Path] = None, max_shard_size: int | str = "5GB",
              tokenizer: Optional[str | Path] = None, force: bool = False) -> Path:
    """Write a checkpoint of a run as a Hugging Face Llama folder that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer`` load offline:
    config.json, generation_config.json, model.safetensors (or shards and an index) and the
    tokenizer (``tokenizer`` overrides the run's ``data.tokenizer``). Everything is written into
    a temporary folder beside ``out_dir`` and renamed into place last, so a failed export
    leaves nothing that looks valid. ``out_dir`` must not exist or be empty (unless ``force``:
    then it is replaced whole, once the new folder is complete)."""
    out_dir = Path(out_dir)
    refuse_to_replace([out_dir], force)
    max_bytes = parse_size(max_shard_size)
    run_dir, ckpt = _locate(run_dir_or_checkpoint, checkpoint)
    cfg = RunDir(run_dir).load_config()  # its relative paths taken from where it was launched
    # Checkpoints name full tensors by their single-process names and shapes (each pipeline
    # stage writes its layers, each tensor-parallel rank its shards as chunks of them), so a
    # run of any layout loads into one process here.
    tok_path = Path(tokenizer or cfg.data.tokenizer or "")
    if not (tokenizer or cfg.data.tokenizer):
        raise InteropError(f"{run_dir}/config.yaml has no data.tokenizer; pass the tokenizer "
                           "model explicitly (--tokenizer)")
    if not tok_path.is_file():
        raise InteropError(f"tokenizer model not found: {tok_path}")
    n_pieces = spm.SentencePieceProcessor(model_file=str(tok_path)).get_piece_size()
    if n_pieces > cfg.model.vocab_size:
        raise InteropError(f"the tokenizer has {n_pieces} pieces but model.vocab_size is "
                           f"{cfg.model.vocab_size}")

    verify(ckpt, cfg.model)
    model = build_model(cfg.model, seed=cfg.train.seed, device="cpu")
    CheckpointManager(ckpt.parent).load(ckpt, model, optimizer=None)
    state = {k: v.detach().to(torch.float32).contiguous().clone()
             for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise InteropError(f"{ckpt}: {name} holds NaN or infinite values (the run diverged); "
                               "export an earlier checkpoint with --checkpoint")
    tensors = to_hf_state_dict(state, tied=cfg.model.tie_embeddings)

    with staging_dir(out_dir) as tmp:  # an existing out_dir is empty, or replaced (force)
        ids = write_hf_tokenizer(tok_path, tmp)
        config = hf_config_from_model(cfg.model, ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
               "pad_token_id": config["pad_token_id"], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_safetensors(tensors, tmp, max_bytes)
    return out_dir


# ---------------------------------------------------------------------------- import


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise InteropError(f"{hf_dir} holds no model.safetensors (or index); only safetensors "
                           "weights can be imported")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not (hf_dir / f).is_file():
            raise InteropError(f"{hf_dir / f}: shard named in the index is missing")
        tensors.update(load_file(str(hf_dir / f)))
    return tensors


def import_hf(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our ModelConfig fields, state dict in our names) of an HF Llama folder. Every expected
    tensor must be present with the shape the config implies; extras are refused."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise InteropError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    try:
        hf_cfg = json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{hf_dir / 'config.json'}: not valid JSON: {e}") from None
    fields = model_fields_from_hf_config(hf_cfg)
    state = from_hf_state_dict(_read_hf_weights(hf_dir), tied=fields["tie_embeddings"])
    # The shapes a model of this config expects, from a model built on the meta device.
    with on_meta_device():
        ref = Transformer(ModelConfig(**fields, kernels=False))
    _check_state(ref.state_dict(), state, source=str(hf_dir))
    return fields, state


def _check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(got))
    if missing:
        raise InteropError(f"{source}: missing weights for {missing[:4]}"
                           + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    extra = sorted(set(got) - set(expected))
    if extra:
        raise InteropError(f"{source}: weights {extra[:4]} do not belong to a model of this config")
    for name, t in expected.items():
        if tuple(got[name].shape) != tuple(t.shape):
            raise InteropError(f"{source}: {name} has shape {tuple(got[name].shape)}, the config "
                               f"implies {tuple(t.shape)}")


def load_init(model: torch.nn.Module, spec: str) -> None:
    """Copy the weights of ``spec`` = ``"hf:DIR"`` into an already built model, after checking
    that the checkpoint's config describes the same model (each mismatch named by its key)."""
    if not isinstance(spec, str) or not spec.startswith("hf:") or len(spec) <= 3:
        raise InteropError(f"model.init_from: expected 'hf:DIR', got {spec!r}")
    fields, state = import_hf(spec[3:])
    cfg: ModelConfig = model.cfg
    ours = {
        "vocab_size": cfg.vocab_size, "dim": cfg.dim, "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads, "n_kv_heads": model.dims.n_kv_heads, "ffn_dim": model.dims.ffn_dim,
        "rope_theta": float(cfg.rope_theta), "norm_eps": float(cfg.norm_eps),
        "tie_embeddings": cfg.tie_embeddings,
    }
    for key, value in ours.items():
        if fields[key] != value:
            raise InteropError(f"model.init_from: model.{key}={value} but {spec[3:]} has "
                               f"{key}={fields[key]}; set model.{key}={fields[key]}")
    with on_meta_device():  # the whole model's names and shapes, for any rank's part too
        whole = Transformer(cfg)
    _check_state(whole.state_dict(), state, source=spec[3:])
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        model.load_state_dict({k: local_slice(params[k], state[k]) for k in model.state_dict()}, strict=True)
