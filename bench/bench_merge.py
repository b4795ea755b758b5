"""Time and peak resident memory of merging a LoRA adapter into a base, and of GGUF export.

Writes a synthetic bf16 Meta checkpoint of about --gb gigabytes in 2 model-parallel shards
(vocabulary 32,000; bench_convert's maker) and a PEFT-format adapter for it shaped like
the published Chinese-LLaMA-Plus ones: LoRA of rank --rank on all seven projections, and
`embed_tokens`/`lm_head` grown to --vocab rows (fp16, in `modules_to_save`), with a
tokenizer.model of that many pieces. The tokenizers are synthetic sentencepiece models:
only their size matters here. Then, each in a fresh process, it measures wall time and
peak resident set (VmHWM) of

    merge -> hf          python -m model.merge_lora ... --output_type huggingface
    merge -> gguf f16    python -m model.merge_lora ... --output_type gguf --dtype f16
    convert -> gguf f16  python -m model.convert BASE out.gguf --to gguf --dtype f16

and prints the peak as a fraction of the base's size, with and without the process's
baseline (Python + torch imported).

    python bench/bench_merge.py [--gb 1.1] [--rank 8] [--vocab 49953] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_convert import make_meta_checkpoint  # noqa: E402

from model.formats.hf import canonical_to_hf_name  # noqa: E402
from model.llama import ModelArgs  # noqa: E402
from model.source import expected_shapes  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {bench!r})
from memory import peak_rss_bytes, reset_peak, rss_bytes
from model.tensor_io import return_freed_memory_promptly
from {module} import main
return_freed_memory_promptly()  # as the command line does
base = rss_bytes(); reset_peak(); start = time.perf_counter()
main({argv!r})
print(json.dumps({{"base": base, "peak": peak_rss_bytes(), "seconds": time.perf_counter() - start}}))
"""
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic_tokenizer(path: Path, n_pieces: int) -> Path:
    """A loadable sentencepiece model of `n_pieces` pieces (specials, 256 bytes, then words)."""
    proto = sp_pb2.ModelProto()
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = sp_pb2.TrainerSpec.BPE, n_pieces, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", True
    kind = sp_pb2.ModelProto.SentencePiece
    for piece, t in (("<unk>", kind.UNKNOWN), ("<s>", kind.CONTROL), ("</s>", kind.CONTROL)):
        proto.pieces.add(piece=piece, score=0.0, type=t)
    for b in range(256):
        proto.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=kind.BYTE)
    for i in range(n_pieces - len(proto.pieces)):
        proto.pieces.add(piece=f"\u2581w{i}", score=-float(i), type=kind.NORMAL)
    path.write_bytes(proto.SerializeToString())
    return path


def make_peft_adapter(out: Path, args: ModelArgs, vocab: int, rank: int) -> int:
    """A PEFT LoRA adapter for `args` (fp16, as published); returns its size in bytes."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (n_out, n_in) in ((n, s) for n, s in expected_shapes(args).items() if len(s) == 2):
        hf = canonical_to_hf_name(name)
        if name in ("tok_embeddings.weight", "output.weight"):  # grown, trained whole
            tensors[f"base_model.model.{hf}"] = (torch.randn(vocab, n_in, generator=g) * 0.02).half()
            continue
        module = f"base_model.model.{hf.removesuffix('.weight')}"
        tensors[f"{module}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) * 0.01).half()
        tensors[f"{module}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.01).half()
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 32,
              "lora_dropout": 0.05, "target_modules": PEFT_TARGETS, "bias": "none",
              "modules_to_save": ["embed_tokens", "lm_head"], "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    synthetic_tokenizer(out / "tokenizer.model", vocab)
    return sum(f.stat().st_size for f in out.iterdir())


def measure(module: str, argv: list[str]) -> dict:
    """Run `module`'s main(argv) in a fresh process; its baseline, peak RSS and wall time."""
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), module=module, argv=argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise SystemExit(f"{module} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def steps(tmp: Path) -> list[tuple[str, str, list[str], Path]]:
    """(label, module, argv, output to delete afterwards) of each measured step."""
    merge = ["--base_model", str(tmp / "meta"), "--lora_model", str(tmp / "adapter"), "--no_progress"]
    return [
        ("merge -> hf", "model.merge_lora",
         merge + ["--output_type", "huggingface", "--output_dir", str(tmp / "hf")], tmp / "hf"),
        ("merge -> gguf f16", "model.merge_lora",
         merge + ["--output_type", "gguf", "--dtype", "f16", "--output_dir", str(tmp / "gguf")],
         tmp / "gguf"),
        ("convert -> gguf f16", "model.convert",
         [str(tmp / "meta"), str(tmp / "base.gguf"), "--to", "gguf", "--dtype", "f16",
          "--skip_checksum", "--no_progress"], tmp / "base.gguf"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.1, help="base checkpoint size to synthesise (GB)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapter")
    p.add_argument("--vocab", type=int, default=49953, help="the adapter's vocabulary (rows)")
    p.add_argument("--workdir", help="where to write (default: a temporary directory)")
    a = p.parse_args()
    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="zhllama-bench-"))
    try:
        size = make_meta_checkpoint(tmp / "meta", a.gb)
        synthetic_tokenizer(tmp / "meta" / "tokenizer.model", 32000)
        args = ModelArgs.from_params(json.loads((tmp / "meta" / "params.json").read_text()))
        adapter = make_peft_adapter(tmp / "adapter", args, a.vocab, a.rank)
        print(f"base: {size / 1e9:.2f} GB in 2 Meta shards (bf16, dim {args.dim}, {args.n_layers} "
              f"layers, vocab 32000); adapter: {adapter / 1e6:.0f} MB (r={a.rank}, 7 targets, "
              f"embed_tokens/lm_head {a.vocab} rows, fp16)")
        print(f"{'step':22s}{'wall s':>8s}{'peak RSS':>10s}{'/ base':>8s}{'above baseline / base':>24s}")
        for label, module, argv, output in steps(tmp):
            r = measure(module, argv)
            print(f"{label:22s}{r['seconds']:8.1f}{r['peak'] / 1e9:9.2f}G{r['peak'] / size:8.2f}"
                  f"{(r['peak'] - r['base']) / size:24.2f}", flush=True)
            if output.is_dir():  # keep the disk use to one output at a time
                shutil.rmtree(output)
            else:
                output.unlink()
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
