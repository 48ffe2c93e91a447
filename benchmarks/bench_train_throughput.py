"""Training throughput: our trainer's step vs Hugging Face transformers' LlamaForCausalLM.

Both models have the same shape (layers, width, heads, KV heads, FFN, vocabulary, untied
head, no biases), are randomly initialised, see the same batch, use the same thread count
and the same optimizer (torch AdamW, same hyper-parameters), and are timed in the same
process, alternating, after warm-up. One step = forward + backward + clip + AdamW step,
over ``--accum`` micro-batches, exactly what ``Trainer.train_step`` does.

    python benchmarks/bench_train_throughput.py --threads 2 --out benchmarks/RESULTS.md

Prints a Markdown table (device, versions, date) and appends it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from kis_megatron.config import ModelConfig, TrainConfig
from kis_megatron.model.llama import build_model, compile_blocks
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
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

    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, max_seq_len=args.seq + 1)
    ours = build_model(cfg, seed=0)
    theirs = hf_model(cfg, ours.dims.ffn_dim)
    n_ours, n_theirs = ours.num_params(), sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, f"shapes differ: {n_ours} vs {n_theirs} parameters"
    tcfg = TrainConfig(lr=1e-4)
    cpu = torch.device("cpu")
    tokens = torch.randint(0, args.vocab, (args.micro * args.accum, args.seq + 1),
                           generator=torch.Generator().manual_seed(0))
    steps = {
        "kis-megatron": step_fn(ours, build_optimizer(ours, tcfg, cpu), tokens, args.micro, args.accum, True),
        "HF LlamaForCausalLM": step_fn(theirs, build_optimizer(theirs, tcfg, cpu), tokens, args.micro,
                                       args.accum, False),
    }
    if args.compile:  # both sides compiled the same way: each transformer block
        ours_c = build_model(cfg, seed=0)
        compile_blocks(ours_c)
        theirs_c = hf_model(cfg, ours.dims.ffn_dim)
        for layer in theirs_c.model.layers:
            layer.compile()
        steps["kis-megatron, train.compile=true"] = step_fn(
            ours_c, build_optimizer(ours_c, tcfg, cpu), tokens, args.micro, args.accum, True)
        steps["HF LlamaForCausalLM, blocks compiled"] = step_fn(
            theirs_c, build_optimizer(theirs_c, tcfg, cpu), tokens, args.micro, args.accum, False)
    for s in steps.values():
        time_steps(s, args.warmup)
    times = {k: [] for k in steps}
    for _ in range(args.steps):  # alternate so drift in machine load hits both alike
        for k, s in steps.items():
            times[k] += time_steps(s, 1)
    tokens_per_step = args.micro * args.accum * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens_per_step / v for k, v in med.items()}
    ratio = tps["kis-megatron"] / tps["HF LlamaForCausalLM"]
    ratios = [f"eager / eager: **{ratio:.2f}x**"]
    if args.compile:
        c = "kis-megatron, train.compile=true"
        ratios.append(f"ours compiled / HF eager: **{tps[c] / tps['HF LlamaForCausalLM']:.2f}x**")
        ratios.append(f"compiled / compiled: **{tps[c] / tps['HF LlamaForCausalLM, blocks compiled']:.2f}x**")

    import transformers

    lines = [
        f"### CPU training throughput vs HF transformers ({datetime.date.today()})",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- shape: dim {args.dim}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"vocab {args.vocab}, seq {args.seq}, batch {args.micro} x {args.accum} accumulation "
        f"({n_ours / 1e6:.2f}M parameters), fp32, AdamW, median of {args.steps} steps",
        f"- command: `python benchmarks/bench_train_throughput.py --threads {args.threads} --steps {args.steps}"
        f"{' --compile' if args.compile else ''}` (compilation happens in the warm-up steps)",
        "",
        "| implementation | step time (s) | tokens/s |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {med[k]:.3f} | {tps[k]:,.0f} |" for k in steps]
    lines += ["", "Tokens/s ratio kis-megatron / HF: " + "; ".join(ratios), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
