"""The recipe end to end at toy scale, on the embedded corpus (`make demo`).

    python -m train.recipe --workdir runs/demo [--overwrite]

Steps (each writes one folder under --workdir, the way a user's run would):
  1. tokenizer/  a LLaMA-style sentencepiece tokenizer (BPE, byte fallback, split digits,
                 identity normalisation) trained on the embedded English text;
  2. base-meta/  a tiny LLaMA saved as Meta's 2-shard consolidated.NN.pth checkpoint:
                 the stand-in for the checkpoint a user downloads;
  3. base/       converted to the canonical model directory;
  4. base-hf/    exported for Hugging Face, and read back: logits must be unchanged;
  5. generation  from the model directory with the KV cache.
Later stages (vocabulary merge, pretraining, LoRA, SFT, merge, GGUF) join as they land.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import sentencepiece as spm
import torch

from data.toy import english_documents
from model.checkpoint import from_state_dict, load_model
from model.convert import convert
from model.formats import read_checkpoint, write_meta
from model.generate import SamplingConfig, generate_ids
from model.llama import Transformer, named_args


def train_base_tokenizer(workdir: Path, vocab_size: int = 400) -> Path:
    """Train the toy base tokenizer with LLaMA's tokenizer settings."""
    out = workdir / "tokenizer"
    out.mkdir(parents=True)
    corpus = out / "english.txt"
    corpus.write_text("\n".join(english_documents()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2, num_threads=1,
    )
    return out / "tokenizer.model"


def make_base_checkpoint(workdir: Path, tokenizer: Path, seed: int) -> Transformer:
    """A random tiny LLaMA, saved in Meta's 2-shard layout with its tokenizer."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    args = named_args("tiny", vocab_size=sp.vocab_size())
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.1)
    write_meta(from_state_dict(model.state_dict(), args, tokenizer=tokenizer),
               workdir / "base-meta", n_shards=2, progress=False)
    return model.eval()


def check_round_trip(original: Transformer, hf_dir: Path) -> float:
    """Max |logit difference| between the original model and the one read from hf_dir."""
    reloaded = load_model(read_checkpoint(hf_dir, progress=False)).eval()
    tokens = torch.randint(0, original.args.vocab_size, (2, 32))
    with torch.no_grad():
        return float((original(tokens) - reloaded(tokens)).abs().max())


def sample_text(model_dir: Path, max_new_tokens: int = 24) -> str:
    ckpt = read_checkpoint(model_dir, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer))
    model = load_model(ckpt).eval()
    prompt = [sp.bos_id()] + sp.encode("One day, Lily")
    ids = generate_ids(model, prompt, max_new_tokens, SamplingConfig(temperature=0),
                       stop_ids=(sp.eos_id(),))
    return sp.decode(prompt[1:] + list(ids))


def run(workdir: Path, overwrite: bool = False, seed: int = 0) -> None:
    if workdir.exists():
        if not overwrite:
            raise SystemExit(f"error: {workdir} already exists (use --overwrite to replace it)")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    tok = train_base_tokenizer(workdir)
    print(f"[1/5] tokenizer: {spm.SentencePieceProcessor(model_file=str(tok)).vocab_size()} "
          f"pieces -> {tok}")
    model = make_base_checkpoint(workdir, tok, seed)
    print(f"[2/5] base checkpoint (Meta, 2 shards) -> {workdir / 'base-meta'}")
    convert(workdir / "base-meta", workdir / "base", "zhllama", progress=False)
    print(f"[3/5] canonical model directory -> {workdir / 'base'}")
    convert(workdir / "base", workdir / "base-hf", "hf", progress=False)
    diff = check_round_trip(model, workdir / "base-hf")
    print(f"[4/5] Hugging Face export -> {workdir / 'base-hf'} (max logit change after "
          f"Meta -> zhllama -> HF -> model: {diff:.1e})")
    if diff > 1e-5:
        raise SystemExit(f"error: the conversions changed the logits by {diff}")
    print(f"[5/5] greedy generation (random weights, so no sense yet): {sample_text(workdir / 'base')!r}")
    print(f"done in {time.perf_counter() - t0:.1f} s; outputs in {workdir}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where every step writes (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --workdir if it exists")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(Path(a.workdir), a.overwrite, a.seed)


if __name__ == "__main__":
    main()
