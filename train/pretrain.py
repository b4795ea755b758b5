"""Continued pretraining on packed blocks of Chinese text (Chinese-LLaMA stages 1 and 2).

    torchrun --nproc_per_node 8 train/pretrain.py configs/llama-7b-stage1.yaml [--key=value ..]
    python train/pretrain.py configs/tiny/stage1.yaml      # one process, CPU or one GPU

stage embeddings: only tok_embeddings and output train (optionally only the new rows);
stage lora: LoRA on the projections plus `lora.modules_to_save`; stage full: everything.
Restarted on the same output_dir, a run resumes from its newest checkpoint. At the end it
writes output_dir/model (embeddings, full) or output_dir/adapter (lora).
"""

from __future__ import annotations

import argparse
import sys

from data.datasets import PackedBlocks
from data.shards import DataError, check_tokenizer
from train.config import ConfigError, load_config
from train.distributed import setup, teardown
from train.trainer import build_for_stage, export, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="train/pretrain.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (see configs/)")
    a, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(a.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    dist = setup(cfg.parallel.backend)
    try:
        built = build_for_stage(cfg, dist)
        data_args = dict(block_size=cfg.data.block_size, val_fraction=cfg.data.val_fraction,
                         seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
        train = PackedBlocks(cfg.data.path, split="train", **data_args)
        if built.base.tokenizer is not None:
            check_tokenizer(train.stream.meta, built.base.tokenizer, cfg.data.path)
        val = PackedBlocks(cfg.data.path, split="val", **data_args) if cfg.data.val_fraction else None
        run(cfg, built, train, dist, val, seq_len=cfg.data.block_size)
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
