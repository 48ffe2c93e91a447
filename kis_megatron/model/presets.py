"""Named model sizes. Llama-style shapes; parameter counts are for the default 32k vocabulary
(untied), as reported by ``Transformer.num_params()``.

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
