"""The whole Chinese-LLaMA recipe at toy scale, on the embedded corpus (`make demo`).

    zhllama demo --workdir runs/demo [--overwrite]        # or: python -m train.recipe

Every step runs the same command a user would run on a real model, and leaves its output
under --workdir:
   1. tokenizer/     an English "LLaMA" tokenizer (BPE, byte fallback, split digits)
   2. base-meta/     a tiny LLaMA, briefly trained on English, saved as Meta's 2 shards
   3. zh-sp/         a Chinese sentencepiece model              (zhllama train-tokenizer)
   4. merged/        the merged vocabulary + pad token           (zhllama merge-tokenizer)
   5. base-zh/       embeddings grown, sub-token initialised      (zhllama resize)
   6. tokens/, sft/  pre-tokenized shards                         (zhllama prepare)
   7. stage1/        embeddings trained, transformer frozen       (zhllama pretrain)
   8. stage2/        LoRA + embeddings                            (zhllama pretrain)
   9. pretrained/    stage 2's adapter merged                     (zhllama merge-lora)
  10. sft/           instruction tuning with LoRA                 (zhllama sft)
  11. final-*        merged and exported: Hugging Face, Meta .pth, GGUF
  12. generation     with the instruction template                (zhllama generate)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from data.toy import chinese_documents, english_documents
from tokenizer.cli import INTERRUPTED_EXIT, ArgumentParser, CommandError, command_errors
from train.cli import command_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def step(n: int, text: str) -> None:
    print(f"[{n:2d}/12] {text}", flush=True)


def zhllama(*args: str) -> str:
    """Run `zhllama ARGS` as its own process, as a user would; return what it printed."""
    r = subprocess.run(command_line(*args), capture_output=True, text=True)
    if r.returncode == INTERRUPTED_EXIT:
        raise KeyboardInterrupt
    if r.returncode:
        # The step's own one-line error says it all; failing that, its last words.
        lines = [l.strip() for l in r.stderr.splitlines() if l.strip()]
        said = [l[len("error:"):].strip() for l in lines if l.startswith("error:")]
        detail = said[-1] if said else lines[-1] if lines else f"exit status {r.returncode}"
        raise CommandError(f"`zhllama {args[0]} …` failed: {detail}")
    return r.stdout


def write_corpora(work: Path) -> dict[str, Path]:
    """English and Chinese text, and Alpaca-style instructions, from the embedded corpus."""
    corpus = work / "corpus"
    corpus.mkdir()
    en, zh = english_documents(600, seed=1), chinese_documents(600, seed=2)
    files = {"en": corpus / "english.txt", "zh": corpus / "chinese.txt", "sft": corpus / "alpaca.json"}
    # Real LLaMA knows English well, the template's words included; so does our stand-in.
    from tokenizer.templates import format_prompt

    template = format_prompt("cla_v1", "Continue the story.").replace("\n", " ")
    files["en"].write_text("\n".join(en + [template] * 200) + "\n", encoding="utf-8")
    files["zh"].write_text("\n".join(zh + en[:150]) + "\n", encoding="utf-8")
    records = [{"instruction": "请续写：" + d[:8], "input": "", "output": d[8:]} for d in zh[:300]]
    records += [{"instruction": "Continue: " + d[:20], "input": "", "output": d[20:]} for d in en[:100]]
    files["sft"].write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return files


def english_base(work: Path, files: dict[str, Path]) -> None:
    """Steps 1–2: a small English LLaMA that stands in for Meta's checkpoint."""
    import sentencepiece as spm

    from model.formats import write_meta, write_model_dir
    from model.llama import build_model, named_args
    from model.source import from_state_dict

    (work / "tokenizer").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(files["en"]), model_prefix=str(work / "tokenizer" / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2, num_threads=1)
    tok = work / "tokenizer" / "tokenizer.model"
    args = named_args("tiny", vocab_size=600, dim=128, n_layers=4, max_seq_len=512)
    write_model_dir(from_state_dict(build_model(args).state_dict(), args, tok), work / "random",
                    progress=False)
    zhllama("prepare", "--tokenizer", str(tok), "--input", str(files["en"]),
            "--output_dir", str(work / "en-tokens"), "--num_workers", "1")
    zhllama("pretrain", str(CONFIGS / "stage1.yaml"), "--stage=full",
            f"--model.path={work / 'random'}", f"--data.path={work / 'en-tokens'}",
            f"--output_dir={work / 'en-train'}", "--optim.max_steps=150", "--optim.lr=3e-3",
            "--checkpoint.every=0", "--log.eval_every=0")
    from model.formats import read_checkpoint

    write_meta(read_checkpoint(work / "en-train" / "model"), work / "base-meta", n_shards=2,
               progress=False)


def chinese_vocabulary(work: Path, files: dict[str, Path]) -> None:
    """Steps 3–5: train, merge, resize."""
    zhllama("train-tokenizer", "--input", str(files["zh"]), "--model_prefix",
            str(work / "zh-sp" / "chinese_sp"), "--vocab_size", "200", "--num_threads", "1")
    out = zhllama("merge-tokenizer", "--llama_tokenizer_dir", str(work / "tokenizer"),
                  "--chinese_sp_model_file", str(work / "zh-sp" / "chinese_sp.model"),
                  "--output_dir", str(work / "merged"), "--add_pad_token")
    print("        " + out.strip().splitlines()[1])
    zhllama("convert", str(work / "base-meta"), str(work / "base"), "--to", "zhllama",
            "--no_progress")
    zhllama("resize", str(work / "base"), "--tokenizer", str(work / "merged"),
            "--output", str(work / "base-zh"), "--init", "subtoken", "--no_progress")


def train_stages(work: Path, files: dict[str, Path]) -> None:
    """Steps 6–10: data, stage 1, stage 2 (merged), SFT."""
    tok = str(work / "merged")
    zhllama("prepare", "--tokenizer", tok, "--input", str(files["zh"]), "--output_dir",
            str(work / "tokens"), "--num_workers", "1")
    zhllama("prepare", "--sft", "--tokenizer", tok, "--input", str(files["sft"]),
            "--output_dir", str(work / "sft-data"), "--max_seq_length", "256", "--num_workers", "1")
    step(7, "stage 1: embeddings")
    zhllama("pretrain", str(CONFIGS / "stage1.yaml"),
            f"--model.path={work / 'base-zh'}", f"--data.path={work / 'tokens'}",
            f"--output_dir={work / 'stage1'}")
    step(8, "stage 2: LoRA + embeddings")
    zhllama("pretrain", str(CONFIGS / "stage2.yaml"),
            f"--model.path={work / 'stage1' / 'model'}", f"--data.path={work / 'tokens'}",
            f"--output_dir={work / 'stage2'}")
    step(9, "merge stage 2's adapter")
    zhllama("merge-lora", "--base_model", str(work / "stage1" / "model"), "--lora_model",
            str(work / "stage2" / "adapter"), "--output_type", "zhllama", "--output_dir",
            str(work / "pretrained"), "--no_progress")
    step(10, "instruction tuning (LoRA)")
    zhllama("sft", str(CONFIGS / "sft.yaml"),
            f"--model.path={work / 'pretrained'}", f"--data.path={work / 'sft-data'}",
            f"--output_dir={work / 'sft'}")


def ship(work: Path) -> None:
    """Step 11: merge the SFT adapter and export everywhere."""
    adapter = str(work / "sft" / "adapter")
    for out_type, out in (("zhllama", "final"), ("huggingface", "final-hf"), ("pth", "final-meta")):
        zhllama("merge-lora", "--base_model", str(work / "pretrained"), "--lora_model",
                adapter, "--output_type", out_type, "--output_dir", str(work / out),
                "--shards", "2" if out_type == "pth" else "1", "--pad_vocab_to_multiple_of", "64",
                "--no_progress")
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("        (gguf not installed: skipping the GGUF export; pip install 'zhllama[gguf]')")
        return
    zhllama("convert", str(work / "final"), str(work / "final.gguf"), "--to", "gguf",
            "--dtype", "f32", "--no_progress")


def losses(run_dir: Path) -> str:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    return f"loss {train[0]:.2f} -> {train[-1]:.2f}"


def run(work: Path, overwrite: bool = False) -> None:
    if work.exists():
        if not overwrite:
            raise FileExistsError(f"{work} already exists (use --overwrite to replace it)")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    files = write_corpora(work)
    step(1, "English tokenizer and a tiny English LLaMA (the stand-in for Meta's)")
    english_base(work, files)
    step(2, f"base checkpoint as Meta's 2 shards -> {work / 'base-meta'} ({losses(work / 'en-train')})")
    step(3, "Chinese tokenizer, merged into the base's (+ pad), embeddings resized")
    chinese_vocabulary(work, files)
    step(6, "pre-tokenized shards (pretraining text and instruction data)")
    train_stages(work, files)
    print(f"        stage 1 {losses(work / 'stage1')}; stage 2 {losses(work / 'stage2')}; "
          f"SFT {losses(work / 'sft')}")
    step(11, "merged and exported: Hugging Face, Meta .pth (2 shards), GGUF")
    ship(work)
    out = zhllama("generate", str(work / "final"), "--template", "cla_v1", "--prompt",
                  "请续写：有一天，小明在", "--temperature", "0", "--max_new_tokens", "40")
    step(12, f"generation: {out.strip()!r}")
    print(f"done in {time.perf_counter() - t0:.0f} s; everything is under {work}")


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m train.recipe", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where every step writes (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --workdir if it exists")
    a = p.parse_args(argv)
    with command_errors(output=a.workdir):
        run(Path(a.workdir), a.overwrite)


if __name__ == "__main__":
    main()
