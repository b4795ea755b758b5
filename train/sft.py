"""Instruction tuning on prepared SFT data: the loss covers response tokens only.

    torchrun --nproc_per_node 8 train/sft.py configs/llama-7b-sft.yaml [--key=value ..]
    python train/sft.py configs/tiny/sft.yaml

`stage: lora` (LoRA + `lora.modules_to_save`, Chinese-Alpaca's recipe) or `stage: full`.
The model's tokenizer must be the one the data was prepared with (checked), and carry the
pad token the data uses. Writes output_dir/adapter (lora) or output_dir/model (full).
"""

from __future__ import annotations

from data.datasets import SFTDataset
from data.shards import DataError, check_tokenizer
from train.trainer import script_main


def sft_samples(cfg, dist, built):
    """This rank's shuffled instruction samples (packed several per row with data.pack),
    and the held-out samples when data.val_fraction is set."""
    kw = dict(seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, pack=cfg.data.pack,
              max_seq_length=cfg.data.max_seq_length, val_fraction=cfg.data.val_fraction)
    data = SFTDataset(cfg.data.path, split="train", **kw)
    if built.base.tokenizer is not None:
        check_tokenizer(data.stream.meta, built.base.tokenizer, cfg.data.path)
    if data.stream.meta["vocab_size"] > built.base.args.vocab_size:
        raise DataError(f"{cfg.data.path}: vocabulary {data.stream.meta['vocab_size']} is larger "
                        f"than the model's {built.base.args.vocab_size}; resize the model first")
    val = SFTDataset(cfg.data.path, split="val", **kw) if cfg.data.val_fraction else None
    return data, val, data.max_seq_length


def main(argv: list[str] | None = None) -> None:
    script_main(argv, "train/sft.py", __doc__, sft_samples, stages=("lora", "full"))


if __name__ == "__main__":
    main()
