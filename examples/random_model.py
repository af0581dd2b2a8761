"""Save a LLaMA with random weights and real dimensions, for speed measurements where real weights cannot go.

    python examples/random_model.py --like /path/to/hf-folder --out /tmp/smol-shaped   (same config, fresh weights)
    python examples/random_model.py --preset llama-1b --out /tmp/llama-1b             (Llama-3.2-1B dimensions)
    python examples/random_model.py --preset smollm2 --out /tmp/smol-shaped           (SmolLM2-135M's, no tokenizer)

Speed depends on shapes, not values; answers from random weights mean nothing.
A tokenizer found beside `--like`'s config is copied, so benches build the same prompts.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),  # fmt: skip
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),  # fmt: skip
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--like", type=Path, help="HF folder whose config.json to copy")
    source.add_argument("--preset", choices=sorted(PRESETS), help="built-in dimensions")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="dtype of the saved weights")
    args = parser.parse_args()
    config = LlamaConfig.from_pretrained(args.like) if args.like else LlamaConfig(**PRESETS[args.preset])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    model.save_pretrained(args.out)
    if args.like:
        for name in TOKENIZER_FILES:
            if (args.like / name).exists():
                shutil.copy(args.like / name, args.out / name)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random parameters to {args.out}")


if __name__ == "__main__":
    main()
