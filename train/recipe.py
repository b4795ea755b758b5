"""The whole Chinese-LLaMA recipe at toy scale, on the embedded corpus (`make demo`).

    zhllama demo --workdir runs/demo [--overwrite]        # or: python -m train.recipe

Every step runs the command a user would run on a real model, as its own process, and
leaves its output under --workdir; each step's line says what it wrote where:
   1. corpus/        English and Chinese text (train + held out), instruction data
   2. base-meta/     an English tokenizer and a tiny LLaMA trained on English: the stand-in
                     for Meta's checkpoint, saved as Meta's 2 shards
   3. zh-sp/         a Chinese sentencepiece model              (zhllama train-tokenizer)
   4. merged/        the merged vocabulary + pad token           (zhllama merge-tokenizer)
   5. base-zh/       embeddings grown, sub-token initialised      (zhllama convert, resize)
   6. tokens-*/      pre-tokenized shards                         (zhllama prepare)
   7. stage1/        embeddings trained, transformer frozen       (zhllama pretrain)
   8. stage2/        LoRA + embeddings, 20% English replay        (zhllama pretrain)
   9. pretrained/    stage 2's adapter merged                     (zhllama merge-lora)
  10. sft/           instruction tuning with LoRA                 (zhllama sft)
  11. final*         merged and exported: Hugging Face, Meta .pth, GGUF
  12. generation     answers to questions the demo's data answers (zhllama generate)
Held-out Chinese and English text is scored in bits per character (zhllama evaluate)
before stage 1 and after each stage, so the closing table shows Chinese improving and
what happens to English; loss.png draws the three training runs (zhllama plot).

Everything is seeded: two runs print the same figures and the same text (times aside).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from data.toy import chinese_documents, english_documents, fact_documents, fact_questions
from tokenizer.cli import INTERRUPTED_EXIT, ArgumentParser, CommandError, command_errors
from train.cli import command_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
STEPS = 12
# Chinese-Alpaca's recommended sampling (its scripts/inference defaults), and greedy
SAMPLING = ("--temperature", "0.2", "--top_k", "40", "--top_p", "0.9", "--repetition_penalty", "1.1")
QUESTIONS = ("小明最喜欢去哪里？", "李华有什么？", "谁最喜欢去图书馆？")


def step(n: int, text: str) -> None:
    print(f"[{n:2d}/{STEPS}] {text}", flush=True)


def note(text: str) -> None:
    print(f"        {text}", flush=True)


def _pump(stream, sink, keep: list[bytes]) -> None:
    """Copy a child's stream to `sink` as it comes (progress bars redraw with \\r), keeping it."""
    for chunk in iter(lambda: stream.read1(4096), b""):
        keep.append(chunk)
        if sink is not None:
            sink.write(chunk)
            sink.flush()


def zhllama(*args: str, show_progress: bool = True) -> str:
    """Run `zhllama ARGS` as its own process, as a user would; its progress bars and notes
    (stderr) are shown as they come; return what it printed on stdout."""
    proc = subprocess.Popen(command_line(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = [], []
    sink = sys.stderr.buffer if show_progress else None
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, None, out)),
             threading.Thread(target=_pump, args=(proc.stderr, sink, err))]
    for t in pumps:
        t.start()
    for t in pumps:
        t.join()
    code = proc.wait()
    if code == INTERRUPTED_EXIT:
        raise KeyboardInterrupt
    if code:
        # The step's own one-line error says it all; failing that, its last words.
        lines = [l.strip() for l in b"".join(err).decode(errors="replace").splitlines() if l.strip()]
        said = [l[len("error:"):].strip() for l in lines if l.startswith("error:")]
        detail = said[-1] if said else lines[-1] if lines else f"exit status {code}"
        raise CommandError(f"`zhllama {args[0]} …` failed: {detail}")
    return b"".join(out).decode()


def write_corpora(work: Path) -> dict[str, Path]:
    """English and Chinese text (training and held out) and instruction data, from the
    embedded corpus; the held-out text is drawn with other seeds than the training text."""
    corpus = work / "corpus"
    corpus.mkdir()
    from tokenizer.templates import format_prompt

    en, zh = english_documents(600, seed=1), chinese_documents(600, seed=2)
    files = {name: corpus / f"{name}.txt" for name in ("en", "zh", "en-val", "zh-val")}
    files["sft"] = corpus / "alpaca.json"
    # Real LLaMA knows English well, the template's words included; so does our stand-in.
    template = format_prompt("cla_v1", "Continue the story.").replace("\n", " ")
    files["en"].write_text("\n".join(en + [template] * 100) + "\n", encoding="utf-8")
    files["zh"].write_text("\n".join(zh + fact_documents() * 40) + "\n", encoding="utf-8")
    files["en-val"].write_text("\n".join(english_documents(40, seed=11)) + "\n", encoding="utf-8")
    files["zh-val"].write_text("\n".join(chinese_documents(40, seed=12)) + "\n", encoding="utf-8")
    records = [{"instruction": q, "input": "", "output": a} for q, a in fact_questions()] * 10
    records += [{"instruction": "请续写：" + d[:8], "input": "", "output": d[8:]} for d in zh[:120]]
    records += [{"instruction": "Continue: " + d[:20], "input": "", "output": d[20:]} for d in en[:40]]
    files["sft"].write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return files


def english_base(work: Path, files: dict[str, Path]) -> None:
    """Step 2: a small English LLaMA that stands in for Meta's checkpoint (seeded)."""
    import sentencepiece as spm
    import torch

    from model.formats import read_checkpoint, write_meta, write_model_dir
    from model.llama import build_model, named_args
    from model.source import from_state_dict

    (work / "tokenizer").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(files["en"]), model_prefix=str(work / "tokenizer" / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2, num_threads=1)
    tok = work / "tokenizer" / "tokenizer.model"
    args = named_args("tiny", vocab_size=600, dim=128, n_layers=4, max_seq_len=512)
    torch.manual_seed(0)  # the stand-in's random start, so that two demos agree
    write_model_dir(from_state_dict(build_model(args).state_dict(), args, tok), work / "random",
                    progress=False)
    zhllama("prepare", "--tokenizer", str(tok), "--input", str(files["en"]),
            "--output_dir", str(work / "en-tokens"), "--num_workers", "1")
    zhllama("pretrain", str(CONFIGS / "stage1.yaml"), "--stage=full",
            f"--model.path={work / 'random'}", f"--data.path={work / 'en-tokens'}",
            f"--output_dir={work / 'en-train'}", "--optim.max_steps=150", "--optim.lr=3e-3",
            "--checkpoint.every=0", "--log.eval_every=0", "--data.val_fraction=0", "--log.plot=false")
    write_meta(read_checkpoint(work / "en-train" / "model"), work / "base-meta", n_shards=2,
               progress=False)


def chinese_vocabulary(work: Path, files: dict[str, Path]) -> None:
    """Steps 3–5: train, merge, convert from Meta's format, resize."""
    zhllama("train-tokenizer", "--input", str(files["zh"]), "--model_prefix",
            str(work / "zh-sp" / "chinese_sp"), "--vocab_size", "160", "--num_threads", "1")
    step(4, f"merged vocabulary + pad -> {work / 'merged'}")
    out = zhllama("merge-tokenizer", "--llama_tokenizer_dir", str(work / "tokenizer"),
                  "--chinese_sp_model_file", str(work / "zh-sp" / "chinese_sp.model"),
                  "--output_dir", str(work / "merged"), "--add_pad_token")
    note(out.strip().splitlines()[1])
    step(5, f"Meta shards converted -> {work / 'base'}; embeddings resized (sub-token init) -> "
            f"{work / 'base-zh'}")
    zhllama("convert", str(work / "base-meta"), str(work / "base"), "--to", "zhllama", "--no_progress")
    zhllama("resize", str(work / "base"), "--tokenizer", str(work / "merged"),
            "--output", str(work / "base-zh"), "--init", "subtoken", "--no_progress")


def prepare_data(work: Path, files: dict[str, Path]) -> None:
    """Step 6: every text tokenized with the merged tokenizer."""
    tok = str(work / "merged")
    for name in ("zh", "en", "zh-val", "en-val"):
        zhllama("prepare", "--tokenizer", tok, "--input", str(files[name]), "--output_dir",
                str(work / f"tokens-{name}"), "--num_workers", "1")
    zhllama("prepare", "--sft", "--tokenizer", tok, "--input", str(files["sft"]),
            "--output_dir", str(work / "sft-data"), "--max_seq_length", "256", "--num_workers", "1")


@dataclass
class Table:
    """The closing table: a row per model, and what each stage cost."""

    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)

    def add(self, name: str, seconds: float | None, run: Path | None, scores: dict[str, float]) -> None:
        tokens = loss = took = ""
        if run is not None:
            lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in lines if "loss" in r]
            loss = f"{train[0]['loss']:.2f} -> {train[-1]['loss']:.2f}"
            tokens = f"{train[-1]['tokens']:,}"
        if seconds is not None:
            took = f"{seconds:.0f} s"
        self.rows.append((name, took, tokens, loss, f"{scores['zh']:.3f}", f"{scores['en']:.3f}"))

    def render(self) -> str:
        head = ("model", "time", "tokens", "train loss", "zh bits/char", "en bits/char")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, self.rows)])


def bits_per_char(work: Path, model: Path, *adapters: Path) -> dict[str, float]:
    """Held-out Chinese and English bits/char of a model (adapters applied in memory)."""
    extra = ["--lora_model", ",".join(map(str, adapters))] if adapters else []
    out = zhllama("evaluate", str(model), *extra, "--input", str(work / "tokens-zh-val"),
                  str(work / "tokens-en-val"), "--json", "--block_size", "256", show_progress=False)
    zh, en = (json.loads(l) for l in out.splitlines())
    return {"zh": zh["bpc"], "en": en["bpc"]}


def train_stages(work: Path, table: Table) -> None:
    """Steps 7–10: stage 1, stage 2 (merged), SFT; each scored on the held-out text."""
    # validated on the held-out text, not on a tail of the training text
    vals = (f"--data.val_sets={{zh: {work / 'tokens-zh-val'}, en: {work / 'tokens-en-val'}}}",
            "--data.val_fraction=0")
    table.add("base-zh (before stage 1)", None, None, bits_per_char(work, work / "base-zh"))
    step(7, f"stage 1: embeddings only -> {work / 'stage1'}")
    t0 = time.perf_counter()
    zhllama("pretrain", str(CONFIGS / "stage1.yaml"), f"--model.path={work / 'base-zh'}",
            f"--data.path={work / 'tokens-zh'}", f"--output_dir={work / 'stage1'}", *vals)
    table.add("stage 1", time.perf_counter() - t0, work / "stage1", bits_per_char(work, work / "stage1" / "model"))
    step(8, f"stage 2: LoRA + embeddings, 20% English replay -> {work / 'stage2'}")
    t0 = time.perf_counter()
    sources = (f"--data.sources=[{{path: {work / 'tokens-zh'}, weight: 0.8, name: zh}}, "
               f"{{path: {work / 'tokens-en'}, weight: 0.2, name: en}}]")
    zhllama("pretrain", str(CONFIGS / "stage2.yaml"), f"--model.path={work / 'stage1' / 'model'}",
            "--data.path=", sources, f"--output_dir={work / 'stage2'}", *vals)
    seconds = time.perf_counter() - t0
    step(9, f"stage 2's adapter merged -> {work / 'pretrained'}")
    zhllama("merge-lora", "--base_model", str(work / "stage1" / "model"), "--lora_model",
            str(work / "stage2" / "adapter"), "--output_type", "zhllama", "--output_dir",
            str(work / "pretrained"), "--no_progress")
    table.add("stage 2", seconds, work / "stage2", bits_per_char(work, work / "pretrained"))
    step(10, f"instruction tuning (LoRA) -> {work / 'sft'}")
    t0 = time.perf_counter()
    zhllama("sft", str(CONFIGS / "sft.yaml"), f"--model.path={work / 'pretrained'}",
            f"--data.path={work / 'sft-data'}", f"--output_dir={work / 'sft'}",
            "--optim.max_steps=150", "--optim.lr=2e-3", "--checkpoint.every=0")
    table.add("sft", time.perf_counter() - t0, work / "sft",
              bits_per_char(work, work / "pretrained", work / "sft" / "adapter"))


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
        note("(gguf not installed: skipping the GGUF export; pip install 'zhllama[gguf]')")
        return
    zhllama("convert", str(work / "final"), str(work / "final.gguf"), "--to", "gguf",
            "--dtype", "f32", "--no_progress")


def answers(work: Path) -> None:
    """Step 12: each question answered greedily and with Chinese-Alpaca's sampling, beside
    the answer the data gives (a model this small often answers about the wrong person)."""
    expected = dict(fact_questions())
    for q in QUESTIONS:
        note(f"{q}  the data says: {expected[q]}")
        for how, flags in (("greedy", ("--temperature", "0")), ("sampled", SAMPLING)):
            out = zhllama("generate", str(work / "final"), "--template", "cla_v1", "--prompt", q,
                          "--max_new_tokens", "40", "--seed", "0", *flags, show_progress=False)
            note(f"  {how + ':':8s} {out.strip()}")


def run(work: Path, overwrite: bool = False) -> None:
    if work.exists():
        if not overwrite:
            raise FileExistsError(f"{work} already exists (use --overwrite to replace it)")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    step(1, f"embedded corpus -> {work / 'corpus'} (English and Chinese, train and held out; "
            "instructions)")
    files = write_corpora(work)
    step(2, f"English tokenizer and a tiny English LLaMA (the stand-in for Meta's) -> {work / 'base-meta'}")
    english_base(work, files)
    step(3, f"Chinese sentencepiece model -> {work / 'zh-sp'}")
    chinese_vocabulary(work, files)
    step(6, f"token shards -> {work}/tokens-{{zh,en,zh-val,en-val}}, {work / 'sft-data'}")
    prepare_data(work, files)
    table = Table()
    train_stages(work, table)
    step(11, f"merged and exported -> {work / 'final'}, {work / 'final-hf'} (Hugging Face), "
             f"{work / 'final-meta'} (Meta .pth, 2 shards), {work / 'final.gguf'}")
    ship(work)
    step(12, "answers (greedy, and sampled at temperature 0.2, top_k 40, top_p 0.9, "
             "repetition penalty 1.1); these questions are in the instruction data")
    answers(work)
    picture = work / "loss.png"
    try:
        zhllama("plot", str(work / "stage1"), str(work / "stage2"), str(work / "sft"),
                "--output", str(picture), show_progress=False)
    except CommandError as e:  # matplotlib missing: the table says it all
        picture = None
        note(f"no loss picture: {e}")
    print("\nheld-out bits per character (lower is better), before stage 1 and after each stage:")
    print(table.render())
    if picture is not None:
        print(f"loss curves: {picture}")
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
