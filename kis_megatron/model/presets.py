"""Named model sizes. Llama-style shapes; the names give the rough size at the default 32k
vocabulary (untied); the exact count of a config is ``model.llama.model_sizes`` (what run.json
records, and ``kis-train --plan`` prints).

``tiny`` (~0.1M parameters) is for CPU tests and CI; the others follow the 125M-7B ladder
that GPU studies use (shapes as in GPT-3/OPT for 125M-1.3B, OpenLLaMA-3B and Llama-2-7B above).
"""

PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256,
                 tie_embeddings=True),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=2048),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, max_seq_len=2048),
    "760m": dict(dim=1536, n_layers=24, n_heads=16, n_kv_heads=16, max_seq_len=2048),
    "1.3b": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, max_seq_len=2048),
    "3b": dict(dim=3200, n_layers=26, n_heads=32, n_kv_heads=32, ffn_dim=8640, max_seq_len=2048),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096),
}


def kernel_shapes(presets=("125m", "350m", "760m", "1.3b", "3b", "7b"), vocabs=(32000, 128256),
                  tp_sizes=(1, 2, 4, 8)) -> list[dict]:
    """The per-rank sizes the kernels see for each shipped GPU preset, vocabulary and
    tensor-parallel size that splits it evenly: hidden size (norms), heads of q and k per
    rank and head dim (RoPE), vocabulary shard (the LM-head loss). For
    ``kis_kernels.aot.op_launches``; duplicates removed."""
    out = []
    for name in presets:
        p = PRESETS[name]
        heads, kv = p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
        for vocab in vocabs:
            for tp in tp_sizes:
                if heads % tp or kv % tp or vocab % tp:
                    continue
                shape = dict(dim=p["dim"], n_heads=heads // tp, n_kv_heads=kv // tp,
                             head_dim=p["dim"] // heads, vocab_local=vocab // tp)
                if shape not in out:
                    out.append(shape)
    return out
