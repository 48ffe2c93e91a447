"""Write a kis-train config that starts from a Hugging Face Llama checkpoint.

    python tools/import_hf.py hf/some-llama --out from_hf.yaml
    kis-train --config from_hf.yaml data.train=shards/general log.dir=runs/from_hf

The YAML holds a ``model:`` section with the checkpoint's sizes and ``init_from: hf:DIR``
(the weights are copied in when training starts), and a ``data:`` section with a ``seq_len``
the model supports (the default, 256, or ``max_position_embeddings`` when that is shorter)
plus ``tokenizer`` when the folder has a ``tokenizer.model``. Anything the checkpoint uses that this model cannot run (RoPE scaling,
biases, another activation, ...) is refused here, before any training.
"""

import argparse
import sys
from pathlib import Path

import yaml

from kis_megatron.config import DataConfig
from kis_megatron.errors import KisError, exit_with
from kis_megatron.interop.hf import import_hf
from kis_megatron.utils import atomic_write_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", help="a Hugging Face Llama folder (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="YAML config to write")
    args = ap.parse_args(argv)
    try:
        hf_dir = Path(args.hf_dir).resolve()
        fields, _ = import_hf(hf_dir)  # reads and checks the weights too, so errors show now
    except (KisError, OSError) as e:  # OSError: the file system refused (path, cause)
        return exit_with(e)
    config = {"model": {**fields, "init_from": f"hf:{hf_dir}"},
              "data": {"seq_len": min(DataConfig().seq_len, fields["max_seq_len"])}}
    if (hf_dir / "tokenizer.model").is_file():
        config["data"]["tokenizer"] = str(hf_dir / "tokenizer.model")
    atomic_write_text(args.out, yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.out}; train with: kis-train --config {args.out} data.train=... log.dir=...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
