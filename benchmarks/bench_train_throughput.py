"""Training throughput: our trainer's step vs Hugging Face transformers' LlamaForCausalLM.

Both models have the same shape (layers, width, heads, KV heads, FFN, vocabulary, untied
head, no biases), are randomly initialised, see the same batch, use the same thread count
and the same optimizer (torch AdamW, same hyper-parameters), and are timed in the same
process, alternating, after warm-up. One step = forward + backward + clip + AdamW step,
over ``--accum`` micro-batches, exactly what ``Trainer.train_step`` does.

    python benchmarks/bench_train_throughput.py --threads 2 --out benchmarks/RESULTS.md

Shapes are ``--shapes DIMxLAYERSxVOCAB,...``: the default runs a small vocabulary (8k) and
Llama's (32k), where the LM head and loss take most of a small model's step. Prints a
Markdown table (device, versions, date) and appends it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from kis_megatron.config import ModelConfig, TrainConfig
from kis_megatron.parallel.parallelize import build_model, compile_blocks
from kis_megatron.training.optim import build_optimizer


def hf_model(cfg: ModelConfig, ffn_dim: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_cfg)


def step_fn(model, opt, tokens, micro, accum, ours: bool):
    def step():
        for i in range(accum):
            chunk = tokens[i * micro:(i + 1) * micro]
            x, y = chunk[:, :-1], chunk[:, 1:]
            if ours:
                loss = model(x, y)
            else:  # HF shifts labels itself: pass the inputs as labels over the same window
                loss = model(input_ids=x, labels=x).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


DEFAULT_SHAPES = "256x4x8192,256x4x32000,512x8x32000"


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        dim, layers, vocab = (int(v) for v in text.split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not DIMxLAYERSxVOCAB, e.g. 256x4x32000")
    return dim, layers, vocab


def measure(args, dim: int, layers: int, vocab: int) -> dict:
    """Median step times (s) of every implementation at one shape, timed alternately."""
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, max_seq_len=args.seq + 1)
    ours = build_model(cfg, seed=0)
    theirs = hf_model(cfg, ours.dims.ffn_dim)
    n_ours, n_theirs = ours.num_params(), sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, f"shapes differ: {n_ours} vs {n_theirs} parameters"
    tcfg = TrainConfig(lr=1e-4)
    cpu = torch.device("cpu")
    tokens = torch.randint(0, vocab, (args.micro * args.accum, args.seq + 1),
                           generator=torch.Generator().manual_seed(0))

    def step(model, is_ours):
        return step_fn(model, build_optimizer(model, tcfg, cpu), tokens, args.micro, args.accum, is_ours)

    steps = {"ours": step(ours, True), "hf": step(theirs, False)}
    if args.compile:  # both sides compiled the same way: each transformer block
        ours_c = build_model(cfg, seed=0)
        compile_blocks(ours_c)
        theirs_c = hf_model(cfg, ours.dims.ffn_dim)
        for layer in theirs_c.model.layers:
            layer.compile()
        steps["ours_compiled"] = step(ours_c, True)
        steps["hf_compiled"] = step(theirs_c, False)
    for s in steps.values():
        time_steps(s, args.warmup)
    times = {k: [] for k in steps}
    for _ in range(args.steps):  # alternate so drift in machine load hits both alike
        for k, s in steps.items():
            times[k] += time_steps(s, 1)
    return {"params": n_ours, **{k: statistics.median(v) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES,
                    help="comma-separated DIMxLAYERSxVOCAB (default: %(default)s)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true",
                    help="also time both models with each transformer block torch.compiled")
    ap.add_argument("--out", help="append the Markdown result to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]

    import transformers

    tokens_per_step = args.micro * args.accum * args.seq
    cols = ["ours (s/step)", "HF (s/step)", "**ours / HF tokens/s**"]
    if args.compile:
        cols += ["ours compiled (s/step)", "HF compiled (s/step)", "ours compiled / HF", "compiled / compiled"]
    lines = [
        f"### CPU training throughput vs HF transformers ({datetime.date.today()})",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- {args.heads} heads / {args.kv_heads} KV heads, seq {args.seq}, batch {args.micro} x {args.accum} "
        f"accumulation ({tokens_per_step} tokens per step), fp32, untied head, AdamW, median of {args.steps} steps",
        f"- command: `python benchmarks/bench_train_throughput.py --threads {args.threads} --steps {args.steps} "
        f"--shapes {args.shapes}{' --compile' if args.compile else ''}`",
        "",
        "| dim x layers x vocab | parameters | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for dim, layers, vocab in shapes:
        m = measure(args, dim, layers, vocab)
        row = [f"{m['ours']:.3f}", f"{m['hf']:.3f}", f"**{m['hf'] / m['ours']:.2f}x**"]
        if args.compile:
            row += [f"{m['ours_compiled']:.3f}", f"{m['hf_compiled']:.3f}",
                    f"{m['hf'] / m['ours_compiled']:.2f}x", f"{m['hf_compiled'] / m['ours_compiled']:.2f}x"]
        lines.append(f"| {dim} x {layers} x {vocab} | {m['params'] / 1e6:.1f}M | " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
