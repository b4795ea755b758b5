"""Measure where zhllama deliberately differs from Chinese-LLaMA-Alpaca's published scripts.

    python experiments/known_differences.py [--tokenizer DIR_OR_FILE] [--corpus DIR]
        [--sft_dir DIR] [--block_size 512] [--workers 8] [--seeds 20]

The published scripts are scripts/training/run_clm_pt_with_peft.py, run_clm_sft_with_peft.py
and build_dataset.py of ymcui/Chinese-LLaMA-Alpaca (pinned to transformers 4.30 and the
datasets library). Their behaviour is modelled here from their source, not run (neither
`datasets` nor transformers 4.30 is a dependency of ours); zhllama's side runs our own
code (`data.prepare`, `data.PackedBlocks`, `data.SFTDataset`). Four differences:

1. Blank lines. datasets' "text" builder makes every line of a .txt a row (Python's
   `str.splitlines()` on the file read in text mode: "\\r", "\\x0b", "\\x1c", "\\u2028" …
   end lines too), blank ones included, and `tokenizer(examples["text"])` gives each row
   BOS and no EOS (LlamaTokenizer: add_bos_token=True, add_eos_token=False): a blank line
   becomes the one-token document `<s>`, and no document ends with `</s>`. We skip blank
   (and whitespace-only) lines, end lines at "\\n" only, and end every document with EOS.
2. Packing. The published `group_texts` runs per .txt file and per `map` batch (1000 rows,
   the datasets default; the script passes none) inside each of `preprocessing_num_workers`
   contiguous shards: each batch's remainder below block_size is dropped, and a batch with
   fewer than block_size tokens is kept whole as one short block. We cut one stream (all
   files of a prepared directory, across file and document boundaries) into blocks and
   drop only the final partial block of each region (train, validation).
3. EOS on SFT truncation. build_dataset.py cuts BOS + prompt + response + "</s>" to
   max_seq_length, so every sample longer than that loses its EOS (and one whose prompt
   alone fills it has no target token at all). We shorten the response (and, if need be,
   the user's content) and keep EOS.
4. Loss normalisation. We divide the step's summed token loss by its number of target
   tokens (all micro-batches and ranks, as transformers' Trainer does since 4.46).
   transformers 4.30 (the published pin) took each micro-batch's mean and averaged those
   over gradient accumulation: with run_sft.sh's 1 sample × 8 accumulation steps every
   sample weighs 1/8 of a step whatever its length. Measured on the token counts of the
   real SFT samples: how unequal the per-token weights become, and the loss of one fixed
   set of per-token losses (a unigram model of the responses) under both rules.

Defaults: the test material beside the checkout (ZHLLAMA_SHARED_DATA overrides its
location): corpus/*.txt, sft/*, and the 49,953-piece Chinese-LLaMA tokenizer, merged from
tokenizers/llama_tokenizer.model and chinese_sp.model into a temporary directory when
--tokenizer is not given. Runs in about half a minute on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("ZHLLAMA_SHARED_DATA", REPO.parent / "shared" / "data"))

from data.datasets import PackedBlocks, TokenStream  # noqa: E402
from data.prepare import parse_options, prepare  # noqa: E402
from data.sft import parse_field_map, read_records  # noqa: E402
from data.text import Unit, decode_lines, documents  # noqa: E402
from tokenizer.files import sha256_file  # noqa: E402
from tokenizer.spm_io import load_sp, resolve_model_file  # noqa: E402
from tokenizer.templates import format_prompt  # noqa: E402

# The published values: datasets' default `map` batch size (build_dataset.py and
# run_clm_pt_with_peft.py pass none), run_pt.sh / run_sft.sh's --preprocessing_num_workers 8,
# run_sft.sh's per_device_train_batch_size 1 × gradient_accumulation_steps 8 on one GPU.
MAP_BATCH_SIZE = 1000
PUBLISHED_WORKERS = 8
PUBLISHED_SAMPLES_PER_STEP = 8
# Our names for the SFT files' fields (the belle files are not in Alpaca's layout).
FIELD_MAPS = {"belle_zh_seed_tasks.jsonl": "input=instances.0.input,output=instances.0.output",
              "belle_eval_set.jsonl": "instruction=question,output=std_answer"}


def quiet(fn: Any, *args: Any) -> Any:
    """fn(*args) with its progress bars and messages swallowed (they are not figures)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def merged_tokenizer(tmp: Path) -> Path:
    """The published 49,953-piece merge of the shared LLaMA and Chinese models."""
    from tokenizer.merge import MergeOptions, merge

    out = tmp / "merged"
    quiet(merge, MergeOptions(llama_tokenizer_dir=SHARED / "tokenizers" / "llama_tokenizer.model",
                              chinese_sp_model_file=SHARED / "tokenizers" / "chinese_sp.model",
                              output_dir=out))
    return out / "tokenizer.model"


def run_prepare(args: list[str]) -> dict[str, Any]:
    return quiet(prepare, parse_options(args + ["--num_workers", "1"]))


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.3f}%" if whole else "n/a"


# 1. Blank lines ---------------------------------------------------------------------------

@dataclass
class LineCounts:
    name: str
    published_rows: int  # rows of datasets' text builder
    blank: int  # rows that are "" (each becomes <s>)
    whitespace: int  # rows of only spaces/tabs… (BOS + the whitespace's pieces)
    blank_tokens: int  # tokens the blank and whitespace rows add to the published stream
    published_tokens: int  # BOS + text per row, no EOS
    our_documents: int
    our_skipped: int
    our_tokens: int  # BOS + text + EOS per document
    lengths: list[int]  # published tokens per row, in order (for packing)


def count_lines(path: Path, sp: Any) -> LineCounts:
    # datasets' builder: open(file, "r") (universal newlines), read, str.splitlines()
    with open(path, encoding="utf-8") as f:
        rows = f.read().splitlines()
    ids = sp.encode(rows)
    lengths = [1 + len(x) for x in ids]
    blank = [i for i, r in enumerate(rows) if r == ""]
    space = [i for i, r in enumerate(rows) if r and r.isspace()]
    # ours: the very functions data.prepare uses (one unit = the whole file)
    skipped: dict[str, int] = {}
    unit = Unit(0, path, 0, path.stat().st_size)
    docs = documents(unit, decode_lines(unit, path.read_bytes(), "strict", skipped), "text", skipped)
    ours = sum(len(x) + 2 for x in sp.encode(docs))
    return LineCounts(path.name, len(rows), len(blank), len(space),
                      sum(lengths[i] for i in blank + space), sum(lengths), len(docs),
                      skipped.get("empty", 0), ours, lengths)


# 2. Packing --------------------------------------------------------------------------------

def contiguous_shards(n: int, num_proc: int | None) -> list[range]:
    """Rows of each worker: datasets' `map(num_proc=…)` → `shard(contiguous=True)`
    (num_proc capped at the number of rows; None: one process)."""
    k = min(num_proc or 1, n) or 1
    div, mod = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        end = start + div + (1 if i < mod else 0)
        out.append(range(start, end))
        start = end
    return out


@dataclass
class Grouping:
    blocks: set[tuple[str, int, int]]  # (file, start offset in the file's stream, length)
    kept: int
    dropped: int
    short_blocks: int
    short_tokens: int


def published_grouping(files: list[LineCounts], block: int, num_proc: int | None) -> Grouping:
    """`group_texts` over each file's map batches, as run_clm_pt_with_peft.py runs it."""
    g = Grouping(set(), 0, 0, 0, 0)
    for f in files:
        offsets = np.concatenate([[0], np.cumsum(f.lengths)])
        for shard in contiguous_shards(len(f.lengths), num_proc):
            for b in range(shard.start, shard.stop, MAP_BATCH_SIZE):
                lo, hi = int(offsets[b]), int(offsets[min(b + MAP_BATCH_SIZE, shard.stop)])
                total = hi - lo
                if total < block:  # kept whole: one short block
                    g.blocks.add((f.name, lo, total))
                    g.kept += total
                    g.short_blocks += 1
                    g.short_tokens += total
                    continue
                n = total // block
                g.blocks.update((f.name, lo + i * block, block) for i in range(n))
                g.kept += n * block
                g.dropped += total - n * block
    return g


# 3. SFT truncation -------------------------------------------------------------------------

@dataclass
class SFTCounts:
    name: str
    limit: int
    samples: int
    lose_eos: int  # published: longer than the limit, so "</s>" is cut off
    no_target: int  # published: the prompt alone fills the limit
    ours_truncated: int
    ours_ending_eos: int


def published_lengths(records: list[Any], sp: Any) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) token counts as build_dataset.py builds them: tokenizer(source)
    = BOS + prompt; tokenizer(output + "</s>", add_special_tokens=False) = the response's
    pieces + the EOS id (the slow LlamaTokenizer splits the special token's text out)."""
    prompts = [format_prompt("cla_v1", r.instruction, r.input) for r in records]
    source = np.array([1 + len(x) for x in sp.encode(prompts)])
    target = np.array([len(x) + 1 for x in sp.encode([r.output for r in records])])
    return source, target


def sft_counts(path: Path, limit: int, sp: Any, tokenizer: Path, tmp: Path) -> tuple[SFTCounts, np.ndarray]:
    """Counts for one file and limit, and our samples' target token counts."""
    field_map = FIELD_MAPS.get(path.name, "")
    records = read_records(path, parse_field_map(field_map), {})
    source, target = published_lengths(records, sp)
    out = tmp / f"sft-{path.stem}-{limit}"
    meta = run_prepare(["--sft", "--template", "cla_v1", "--tokenizer", str(tokenizer),
                        "--input", str(path), "--output_dir", str(out), "--max_seq_length",
                        str(limit), "--field_map", field_map])
    stream = TokenStream(out)
    starts = stream.document_starts()
    ends = np.append(starts[1:], len(stream))
    last = np.array([stream.read(int(e) - 1, 1)[0] for e in ends])
    plens = np.concatenate([np.fromfile(out / f["plen"], dtype="<u4") for f in meta["files"]])
    counts = SFTCounts(path.name, limit, len(records), int((source + target > limit).sum()),
                       int((source >= limit).sum()), meta["truncated"],
                       int((last == sp.eos_id()).sum()))
    return counts, (ends - starts - plens).astype(np.int64)


# 4. Loss normalisation ---------------------------------------------------------------------

@dataclass
class LossWeights:
    steps: int
    ratio_median: float  # largest / smallest per-token weight within a step, 4.30 rule
    ratio_max: float
    tokens_off_2x: float  # share of target tokens whose weight changes by more than 2×
    short_half_share: float  # share of a step's weight on its 4 shortest samples, ours
    loss_rel_mean: float  # mean |L_4.30 - L_ours| / L_ours over steps
    loss_rel_max: float
    loss_bias: float  # mean (L_4.30 - L_ours) / L_ours


def loss_weights(targets: list[np.ndarray], token_losses: list[np.ndarray], per_step: int,
                 seeds: int) -> LossWeights:
    """Shuffle the samples (`seeds` times), cut them into steps of `per_step` one-sample
    micro-batches, and compare 4.30's mean of per-sample means with our token mean."""
    n = np.array([len(t) for t in targets], dtype=np.float64)
    sums = np.array([loss.sum() for loss in token_losses])
    keep = n > 0
    n, sums = n[keep], sums[keep]
    ratios, off, short, rel = [], 0.0, [], []
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(len(n))
        order = order[: len(order) // per_step * per_step].reshape(-1, per_step)
        ns, ss = n[order], sums[order]  # (steps, per_step)
        ratios.append(ns.max(1) / ns.min(1))
        w = ns.mean(1, keepdims=True) / ns  # 4.30 weight ÷ ours, per token of each sample
        off += float((ns * ((w > 2) | (w < 0.5))).sum() / ns.sum())
        srt = np.sort(ns, axis=1)
        short.append(srt[:, : per_step // 2].sum(1) / srt.sum(1))
        old = (ss / ns).mean(1)
        new = ss.sum(1) / ns.sum(1)
        rel.append((old - new) / new)
    r, s, d = np.concatenate(ratios), np.concatenate(short), np.concatenate(rel)
    return LossWeights(len(r) // seeds, float(np.median(r)), float(r.max()), off / seeds,
                       float(s.mean()), float(np.abs(d).mean()), float(np.abs(d).max()),
                       float(d.mean()))


def unigram_losses(samples: list[np.ndarray]) -> list[np.ndarray]:
    """-log p(token) under the unigram distribution of all the responses' tokens."""
    counts = np.bincount(np.concatenate(samples))
    logp = np.log(np.maximum(counts, 1) / counts.sum())
    return [-logp[s] for s in samples]


# ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from tokenizer.cli import ArgumentParser, positive_int

    p = ArgumentParser(prog="python experiments/known_differences.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="sentencepiece model (file or directory; default: the "
                   "published 49,953-piece merge of the shared tokenizers, made in a temporary "
                   "directory)")
    p.add_argument("--corpus", default=str(SHARED / "corpus"), help="directory of .txt files")
    p.add_argument("--sft_dir", default=str(SHARED / "sft"),
                   help="directory of instruction files (.json, .jsonl)")
    p.add_argument("--block_size", type=positive_int, default=512, help="pretraining block (512)")
    p.add_argument("--workers", type=positive_int, default=PUBLISHED_WORKERS,
                   help="the published --preprocessing_num_workers to compare with one process (8)")
    p.add_argument("--max_seq_lengths", type=positive_int, nargs="+", default=[512, 256])
    p.add_argument("--seeds", type=positive_int, default=20, help="shuffles for the loss figures")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="known-diff-") as t:
        tmp = Path(t)
        tokenizer = resolve_model_file(a.tokenizer) if a.tokenizer else merged_tokenizer(tmp)
        sp = load_sp(tokenizer)
        print(f"tokenizer: {tokenizer.name}, {sp.vocab_size():,} pieces, "
              f"sha256 {sha256_file(tokenizer)[:16]}…")
        summary: list[tuple[str, str]] = []

        # 1 ---------------------------------------------------------------------------
        txts = sorted(Path(a.corpus).glob("*.txt"))
        if not txts:
            raise SystemExit(f"error: no .txt files in {a.corpus}")
        files = [count_lines(p, sp) for p in txts]
        print("\n1. Blank lines (published: each is a document <s>; ours: skipped)")
        print("| file | published rows | blank | whitespace-only | our documents | published tokens "
              "| tokens the blank rows add | our EOS tokens (published has none) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for f in files:
            print(f"| {f.name} | {f.published_rows:,} | {f.blank:,} | {f.whitespace:,} | "
                  f"{f.our_documents:,} | {f.published_tokens:,} | {f.blank_tokens:,} "
                  f"({pct(f.blank_tokens, f.published_tokens)}) | {f.our_documents:,} "
                  f"({pct(f.our_documents, f.our_tokens)} of ours) |")
        blank = sum(f.blank + f.whitespace for f in files)
        blank_tok = sum(f.blank_tokens for f in files)
        pub_tok = sum(f.published_tokens for f in files)
        docs = sum(f.our_documents for f in files)
        ours_tok = sum(f.our_tokens for f in files)
        extra_rows = sum(f.published_rows - f.our_documents - f.our_skipped for f in files)
        print(f"rows that splitlines() cuts but \"\\n\" does not: {extra_rows:,}; "
              f"if one blank line followed every document: +{docs:,} <s> tokens "
              f"({pct(docs, pub_tok + docs)} of the published stream)")
        summary.append(("1. blank lines", f"{blank:,} blank rows in {len(files)} files: "
                        f"+{blank_tok:,} tokens ({pct(blank_tok, pub_tok)}); a blank line between "
                        f"documents would add {pct(docs, pub_tok + docs)}; our EOS per document: "
                        f"{pct(docs, ours_tok)} of our tokens"))

        # 2 ---------------------------------------------------------------------------
        L = a.block_size
        ours_dir = tmp / "pretrain"
        run_prepare(["--tokenizer", str(tokenizer), "--input", *map(str, txts),
                     "--output_dir", str(ours_dir)])
        blocks = PackedBlocks(ours_dir, L)
        our_total = len(blocks.stream)
        our_dropped = our_total - blocks.n_blocks * L
        one = published_grouping(files, L, None)
        many = published_grouping(files, L, a.workers)
        moved = len(many.blocks - one.blocks)
        print(f"\n2. Packing into blocks of {L}")
        print("| | blocks | tokens dropped | short blocks (tokens) |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| ours, one stream of {len(txts)} files | {blocks.n_blocks:,} | {our_dropped:,} "
              f"({pct(our_dropped, our_total)}) | 0 |")
        for label, g in (("published, 1 process", one),
                         (f"published, preprocessing_num_workers {a.workers}", many)):
            print(f"| {label} | {len(g.blocks):,} | {g.dropped:,} ({pct(g.dropped, pub_tok)}) | "
                  f"{g.short_blocks:,} ({g.short_tokens:,}) |")
        print(f"published blocks with {a.workers} workers that 1 process does not make: {moved:,} "
              f"of {len(many.blocks):,} ({pct(moved, len(many.blocks))})")
        summary.append((f"2. packing (block {L})",
                        f"published drops {pct(one.dropped, pub_tok)} (1 process) / "
                        f"{pct(many.dropped, pub_tok)} ({a.workers} workers, {many.short_blocks} "
                        f"short blocks, {pct(moved, len(many.blocks))} of blocks change); "
                        f"ours {pct(our_dropped, our_total)}"))

        # 3 ---------------------------------------------------------------------------
        sft_files = sorted(p for p in Path(a.sft_dir).iterdir() if p.suffix in (".json", ".jsonl"))
        print("\n3. SFT samples longer than max_seq_length (template cla_v1)")
        print("| file | max_seq_length | samples | published: lose EOS | published: no target token "
              "| ours: shortened | ours: end with EOS |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        rows, targets = [], {}
        for limit in a.max_seq_lengths:
            for path in sft_files:
                c, t = sft_counts(path, limit, sp, tokenizer, tmp)
                rows.append(c)
                if limit == a.max_seq_lengths[0]:
                    targets[path.name] = t
                print(f"| {c.name} | {limit} | {c.samples:,} | {c.lose_eos:,} "
                      f"({pct(c.lose_eos, c.samples)}) | {c.no_target:,} | {c.ours_truncated:,} | "
                      f"{c.ours_ending_eos:,} |")
        parts = []
        for limit in a.max_seq_lengths:
            rs = [c for c in rows if c.limit == limit]
            lost, n = sum(c.lose_eos for c in rs), sum(c.samples for c in rs)
            parts.append(f"{lost:,} of {n:,} ({pct(lost, n)}) at {limit}")
        summary.append(("3. EOS on SFT truncation", "published loses EOS on " + ", ".join(parts)
                        + "; ours: none"))

        # 4 ---------------------------------------------------------------------------
        limit = a.max_seq_lengths[0]
        samples = []
        for path in sft_files:  # our prepared samples' response tokens (EOS included)
            out = tmp / f"sft-{path.stem}-{limit}"
            stream = TokenStream(out)
            starts = stream.document_starts()
            ends = np.append(starts[1:], len(stream))
            for e, n in zip(ends, targets[path.name]):
                samples.append(stream.read(int(e - n), int(n)).astype(np.int64))
        w = loss_weights(samples, unigram_losses(samples), PUBLISHED_SAMPLES_PER_STEP, a.seeds)
        print(f"\n4. Loss normalisation: {len(samples):,} SFT samples (max_seq_length {limit}), "
              f"steps of {PUBLISHED_SAMPLES_PER_STEP} × 1 sample, {a.seeds} shuffles "
              f"({w.steps} steps each)")
        print("| | transformers 4.30 (mean of micro-batch means) | ours (token mean of the step) |")
        print("| --- | ---: | ---: |")
        print(f"| largest ÷ smallest per-token weight in a step, median (max) | "
              f"{w.ratio_median:.1f}× ({w.ratio_max:,.0f}×) | 1× |")
        print(f"| weight of a step's {PUBLISHED_SAMPLES_PER_STEP // 2} shortest samples | 50% | "
              f"{100 * w.short_half_share:.1f}% |")
        print(f"| target tokens whose weight differs by more than 2× | {100 * w.tokens_off_2x:.1f}% | — |")
        print(f"| loss of fixed per-token losses (unigram), mean (max) relative difference | "
              f"{100 * w.loss_rel_mean:.1f}% ({100 * w.loss_rel_max:.1f}%), mean signed "
              f"{100 * w.loss_bias:+.1f}% | — |")
        summary.append(("4. loss normalisation",
                        f"per-token weights within a step differ by {w.ratio_median:.1f}× (median; "
                        f"max {w.ratio_max:,.0f}×); {100 * w.tokens_off_2x:.1f}% of tokens change "
                        f"weight > 2×; the loss differs by {100 * w.loss_rel_mean:.1f}% on average"))

        print("\nSummary")
        print("| difference | measured size |")
        print("| --- | --- |")
        for k, v in summary:
            print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
