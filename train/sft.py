"""Instruction tuning on prepared SFT data: the loss covers response tokens only.

    torchrun --nproc_per_node 8 train/sft.py configs/llama-7b-sft.yaml [--key=value ..]
    python train/sft.py configs/tiny/sft.yaml

`stage: lora` (LoRA + `lora.modules_to_save`, Chinese-Alpaca's recipe) or `stage: full`.
The model's tokenizer must be the one the data was prepared with (checked), and carry the
pad token the data uses. Writes output_dir/adapter (lora) or output_dir/model (full). With
data.sources, the samples (packed: rows) come from several directories by weight.
"""

from __future__ import annotations

from data.datasets import SFTDataset
from data.mixing import Mixture, open_datasets
from train.data_checks import check_inputs_for_model, check_length
from train.session import TrainingRun
from train.stages import build_for_stage
from train.trainer import export, run


def sft_samples(cfg, dist, built):
    """This rank's shuffled instruction samples (packed several per row with data.pack; of
    data.path, or mixed from data.sources) and its validation sets by name ("": the samples
    data.val_fraction holds out; a source's name: its own; data.val_sets: each directory
    whole)."""
    check_inputs_for_model(cfg.data, built.base, "sft", note=dist.is_main)
    if cfg.data.max_seq_length is not None:
        check_length("data.max_seq_length", cfg.data.max_seq_length, built.base)
    kw = dict(seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, pack=cfg.data.pack,
              max_seq_length=cfg.data.max_seq_length, val_fraction=cfg.data.val_fraction)

    def samples(path: str, split: str) -> SFTDataset:
        data = SFTDataset(path, split=split, **kw)
        if cfg.data.max_seq_length is None:  # rows reach the data's own limit (packed) or its longest sample
            longest = data.max_seq_length if cfg.data.pack else int(data.lengths.max())
            check_length(f"data.max_seq_length (unset: {path} has rows of {longest} tokens)",
                         longest, built.base)
        return data

    d = cfg.data
    return open_datasets(d.path, d.sources, samples, d.val_fraction, d.val_sets)


def row_length(data: SFTDataset | Mixture) -> int:
    """The longest row the run trains on (for the FLOPs per token)."""
    parts = data.sources if isinstance(data, Mixture) else [data]
    return max(p.max_seq_length for p in parts)


def main(argv: list[str] | None = None) -> None:
    """The recipe: config → the model for the stage → data → the loop → the trained output."""
    with TrainingRun(argv, "train/sft.py", __doc__, stages=("lora", "full")) as session:
        cfg, dist = session.cfg, session.dist
        built = session.agree(lambda: build_for_stage(cfg, dist))  # what trains; sharded, loaded
        train, vals = session.agree(lambda: sft_samples(cfg, dist, built))
        session.ranks_on_their_own()
        # "": the held-out split, logged as val_loss etc.; NAME as val/NAME/loss etc.
        run(cfg, built, train, dist, vals or None, seq_len=row_length(train), plan=session.plan,
            fingerprint=session.fingerprint)  # AdamW, schedule, checkpoints, resume
        session.done(export(cfg, built, dist))  # the adapter, or a model directory


if __name__ == "__main__":
    main()
