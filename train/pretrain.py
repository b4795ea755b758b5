"""Continued pretraining on packed blocks of Chinese text (Chinese-LLaMA stages 1 and 2).

    torchrun --nproc_per_node 8 train/pretrain.py configs/llama-7b-stage1.yaml [--key=value ..]
    python train/pretrain.py configs/tiny/stage1.yaml      # one process, CPU or one GPU

stage embeddings: only tok_embeddings and output train (optionally only the new rows);
stage lora: LoRA on the projections plus `lora.modules_to_save`; stage full: everything.
Restarted on the same output_dir, a run resumes from its newest checkpoint. At the end it
writes output_dir/model (embeddings, full) or output_dir/adapter (lora). With
data.sources, the blocks come from several directories by weight (English replay).
"""

from __future__ import annotations

from data.datasets import PackedBlocks
from data.mixing import open_datasets
from train.data_checks import check_inputs_for_model, check_length
from train.session import TrainingRun
from train.stages import build_for_stage
from train.trainer import export, run


def packed_blocks(cfg, dist, built):
    """This rank's training blocks (of data.path, or mixed from data.sources) and its
    validation sets by name ("": the blocks data.val_fraction holds out by documents; a
    source's name: its own held-out tail; data.val_sets: each directory whole), once every
    directory is known to fit the model (kind, tokenizer, ids, block size)."""
    check_length("data.block_size", cfg.data.block_size, built.base)
    check_inputs_for_model(cfg.data, built.base, "pretrain", note=dist.is_main)
    kw = dict(block_size=cfg.data.block_size, val_fraction=cfg.data.val_fraction, seed=cfg.seed,
              rank=dist.rank, world_size=dist.world_size, document_mask=cfg.data.document_mask)
    d = cfg.data
    return open_datasets(d.path, d.sources, lambda path, split: PackedBlocks(path, split=split, **kw),
                         d.val_fraction, d.val_sets)


def main(argv: list[str] | None = None) -> None:
    """The recipe: config → the model for the stage → data → the loop → the trained output."""
    with TrainingRun(argv, "train/pretrain.py", __doc__, stages=("embeddings", "lora", "full")) as session:
        cfg, dist = session.cfg, session.dist
        built = session.agree(lambda: build_for_stage(cfg, dist))  # what trains; sharded, loaded
        train, vals = session.agree(lambda: packed_blocks(cfg, dist, built))
        session.ranks_on_their_own()
        # "": the held-out split, logged as val_loss etc.; NAME as val/NAME/loss etc.
        run(cfg, built, train, dist, vals or None, seq_len=cfg.data.block_size, plan=session.plan,
            fingerprint=session.fingerprint)  # AdamW, schedule, checkpoints, resume
        session.done(export(cfg, built, dist))  # the adapter, or a model directory


if __name__ == "__main__":
    main()
