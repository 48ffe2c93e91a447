"""A Llama-style decoder in plain PyTorch, readable top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings (causal, through
``scaled_dot_product_attention``) -> residual -> RMSNorm -> SwiGLU MLP -> residual, repeated;
a final RMSNorm and the LM head, optionally tied to the token embedding.

The fused pieces (norm, RoPE, SwiGLU, LM-head cross-entropy) go through ``ops`` so the Triton
kernels replace them in one place. The model knows nothing of parallelism; it is applied from
outside (``kis_megatron.parallel.parallelize``), which relies on three plain facts: layers live
in a ``ModuleDict`` keyed by their global index (a pipeline stage drops the ones it does not
own), every projection is a plain ``nn.Linear`` (tensor parallelism swaps it), and the LM head
computes its own loss (``LMHead.loss``; a vocabulary-parallel head computes it over its shard).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from kis_megatron.config import ModelConfig
from kis_megatron.model import ops


def llama_ffn_dim(dim: int, multiple_of: int = 64) -> int:
    """Llama's hidden size rule: 2/3 of 4*dim (SwiGLU has three matrices), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelDims:
    """The sizes every layer needs, resolved once from the config."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ModelDims":
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
            head_dim=cfg.dim // cfg.n_heads,
            ffn_dim=cfg.ffn_dim or llama_ffn_dim(cfg.dim),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps, fused=self.fused)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2), in float32 ("rotate half" layout),
    on the default device. Computed on the CPU whatever that device is, so that every device
    gets the same tables, and a model laid out on the meta device does not pay for torch's
    Python meta path (whose first use imports torch._dynamo, ~1 s)."""
    cpu = torch.device("cpu")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=cpu) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=cpu), inv_freq)
    device = torch.get_default_device()
    return angles.cos().float().to(device), angles.sin().float().to(device)


class CoreAttention(nn.Module):
    """Causal softmax(q k^T / sqrt(hd)) v over (B, heads, T, hd) inputs, grouped-query when k
    and v have fewer heads. No parameters: a module of its own so that selective
    recomputation (``parallel/recompute.py``) can target it, as Megatron does."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))


class Attention(nn.Module):
    def __init__(self, d: ModelDims, fused: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = d.n_heads, d.n_kv_heads, d.head_dim
        self.fused = fused
        self.wq = nn.Linear(d.dim, d.n_heads * d.head_dim, bias=False)
        self.wk = nn.Linear(d.dim, d.n_kv_heads * d.head_dim, bias=False)
        self.wv = nn.Linear(d.dim, d.n_kv_heads * d.head_dim, bias=False)
        self.wo = nn.Linear(d.n_heads * d.head_dim, d.dim, bias=False)
        self.core = CoreAttention()

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        cos, sin = cos[:T], sin[:T]  # the tables cover max_seq_len
        # Head counts come from the weights so a tensor-parallel shard runs the same code.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, nh, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hd)
        q = ops.rope(q, cos, sin, fused=self.fused)
        k = ops.rope(k, cos, sin, fused=self.fused)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        y = self.core(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, d: ModelDims, fused: bool):
        super().__init__()
        self.fused = fused
        self.w_gate = nn.Linear(d.dim, d.ffn_dim, bias=False)
        self.w_up = nn.Linear(d.dim, d.ffn_dim, bias=False)
        self.w_down = nn.Linear(d.ffn_dim, d.dim, bias=False)

    def forward(self, x):
        return self.w_down(ops.swiglu(self.w_gate(x), self.w_up(x), fused=self.fused))


class Block(nn.Module):
    def __init__(self, d: ModelDims, eps: float, fused: bool):
        super().__init__()
        self.attn_norm = RMSNorm(d.dim, eps, fused)
        self.attn = Attention(d, fused)
        self.ffn_norm = RMSNorm(d.dim, eps, fused)
        self.ffn = FeedForward(d, fused)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class LMHead(nn.Linear):
    """The output projection; ``loss`` is the fused projection + cross-entropy, so the full
    (tokens x vocab) logits are never materialised on GPU."""

    def __init__(self, dim: int, vocab_size: int, fused: bool):
        super().__init__(dim, vocab_size, bias=False)
        self.fused = fused

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(h, self.weight, targets, fused=self.fused)


class Transformer(nn.Module):
    """``model(tokens)`` -> logits (B, T, V); ``model(tokens, targets)`` -> mean loss.

    With targets the LM head and cross-entropy run fused (``ops.linear_cross_entropy``), so
    the full (tokens x vocab) logits are never materialised on GPU.
    """

    def __init__(self, cfg: ModelConfig, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cfg = cfg
        d = self.dims = ModelDims.from_config(cfg)
        fused = cfg.kernels
        self.tok_embeddings = nn.Embedding(d.vocab_size, d.dim)
        self.layers = nn.ModuleDict({str(i): Block(d, cfg.norm_eps, fused) for i in range(d.n_layers)})
        self.norm = RMSNorm(d.dim, cfg.norm_eps, fused)
        self.output = LMHead(d.dim, d.vocab_size, fused)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.set_rope_tables()
        self.reset_parameters(generator)

    def set_rope_tables(self) -> None:
        cos, sin = rope_tables(self.dims.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos, sin

    def init_std(self, name: str) -> Optional[float]:
        """The initial std of parameter ``name`` (None: a norm weight, set to 1): init_std,
        the two residual-branch outputs per block scaled by 1/sqrt(2 * n_layers) (GPT-2) so the
        residual stream's variance does not grow with depth."""
        if name.endswith("norm.weight"):
            return None
        std = self.cfg.init_std
        return std / math.sqrt(2 * self.dims.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else std

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Every parameter from ``generator``, in parameter order (init_std)."""
        for name, p in self.named_parameters():
            std = self.init_std(name)
            if std is None:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None):
        B, T = tokens.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        h = self.run_layers(h, self.layers.values())
        return self.head(self.norm(h), targets)

    def run_layers(self, h: torch.Tensor, layers) -> torch.Tensor:
        for layer in layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return h

    def head(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """The LM head on the final normalised hidden states: logits (B, T, V) without
        targets, else the mean loss over targets that are not -100."""
        if targets is None:
            return self.output(h).float()
        return self.output.loss(h.reshape(targets.numel(), -1), targets.reshape(-1))

    # ----------------------------------------------------------------- accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once). ``non_embedding`` drops the token
        embedding (and an untied head), the convention of Kaplan et al. for scaling laws."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.output.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight-multiply parameter (forward 2, backward 4),
        plus causal-free attention scores 6 * 2 * n_layers * dim * seq_len (PaLM, appendix B).
        The LM head counts; the embedding lookup does not."""
        d = self.dims
        matmul_params = self.num_params() - self.tok_embeddings.weight.numel()
        if self.cfg.tie_embeddings:
            matmul_params += self.output.weight.numel()
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        return 6.0 * matmul_params + 12.0 * d.n_layers * d.dim * seq_len


class _SkipRandomInit(TorchFunctionMode):
    """Random initialisers return their tensor untouched: on the meta device they have no
    values to fill, and torch runs them through its Python meta path, whose first use
    imports torch._dynamo (~1 s of every run's start-up)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("normal_", "uniform_"):
            return args[0] if args else kwargs.get("tensor", kwargs.get("self"))
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta_device():
    """Lay out modules built inside on the meta device: shapes only, no memory, no init."""
    with torch.device("meta"), _SkipRandomInit():
        yield


def model_sizes(cfg: ModelConfig, seq_len: int) -> dict:
    """Parameter counts and training FLOPs per token of the whole model (counted on the
    meta device: no memory, whatever the size)."""
    with on_meta_device():
        model = Transformer(cfg)
    return {"model_params": model.num_params(),
            "model_params_non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": model.flops_per_token(seq_len)}
