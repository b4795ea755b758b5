"""Instruction tuning on prepared SFT data: the loss covers response tokens only.

    torchrun --nproc_per_node 8 train/sft.py configs/llama-7b-sft.yaml [--key=value ..]
    python train/sft.py configs/tiny/sft.yaml

`stage: lora` (LoRA + `lora.modules_to_save`, Chinese-Alpaca's recipe) or `stage: full`.
The model's tokenizer must be the one the data was prepared with (checked), and carry the
pad token the data uses. Writes output_dir/adapter (lora) or output_dir/model (full).
"""

from __future__ import annotations

import argparse
import sys

from data.datasets import SFTDataset
from data.shards import DataError, check_tokenizer
from train.config import ConfigError, load_config
from train.distributed import setup, teardown
from train.trainer import build_for_stage, export, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="train/sft.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (see configs/)")
    a, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(a.config, overrides)
        if cfg.stage == "embeddings":
            raise ConfigError("stage: instruction tuning uses stage lora or full")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    dist = setup(cfg.parallel.backend)
    try:
        built = build_for_stage(cfg, dist)
        data = SFTDataset(cfg.data.path, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                          pack=cfg.data.pack)
        if built.base.tokenizer is not None:
            check_tokenizer(data.stream.meta, built.base.tokenizer, cfg.data.path)
        if data.stream.meta["vocab_size"] > built.base.args.vocab_size:
            raise DataError(f"{cfg.data.path}: vocabulary {data.stream.meta['vocab_size']} is larger "
                            f"than the model's {built.base.args.vocab_size}; resize the model first")
        run(cfg, built, data, dist, None, seq_len=data.max_seq_length)
        path = export(cfg, built, dist)
        if dist.is_main:
            print(f"done: {path}")
    except (DataError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        teardown()


if __name__ == "__main__":
    main()
