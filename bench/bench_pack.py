"""Attention over packed documents: SDPA with a dense L×L mask vs flex attention with a
BlockMask vs varlen (flash) attention, forward + backward, side by side in one run — first
the attention alone, then a packed SFT step of the model through each
(`model.packed_attention`).

    python bench/bench_pack.py                       # GPU: 7B heads (32 × 128), rows of 4,096
    python bench/bench_pack.py --smoke               # CPU, toy size: checks the paths agree

Each row of `--seq` tokens holds documents whose lengths follow `--mean_doc` (exponential, as
instruction samples roughly are); all three compute causal attention inside each document
only. Prints time per forward+backward, peak memory, the ratios to the dense mask, and the
largest difference of each output from the dense one. The model step is LLaMA-7B's width
on `--layers` blocks with the vocabulary `--vocab`, LoRA r 8 on the seven projections and
the embeddings and output trained (Chinese-Alpaca's SFT), in bf16, the loss in chunks:
tokens/s of forward + backward and the loss's difference from the dense mask's. On a CPU,
flex attention runs its reference implementation (forward only: torch has no CPU backward
for it) and varlen is CUDA-only, so the smoke run times the dense path and checks agreement.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from memory import timed  # bench/memory.py, beside this script
from model.llama import ModelArgs, flex, segment_block_mask, segment_positions_and_mask


def document_lengths(seq: int, mean: int, gen: torch.Generator) -> list[int]:
    """Lengths of documents filling one row of `seq` tokens (the last one cut to fit)."""
    out, used = [], 0
    while used < seq:
        n = max(1, int(-mean * torch.log(torch.rand(1, generator=gen)).item()))  # exponential
        n = min(n, seq - used)
        out.append(n)
        used += n
    return out


def segments_for(batch: int, seq: int, mean: int, device: torch.device) -> tuple[torch.Tensor, list[list[int]]]:
    gen = torch.Generator().manual_seed(0)
    rows, lengths = [], []
    for _ in range(batch):
        ls = document_lengths(seq, mean, gen)
        rows.append(torch.cat([torch.full((n,), i) for i, n in enumerate(ls)]))
        lengths.append(ls)
    return torch.stack(rows).to(device), lengths


def run_dense(q, k, v, segments):
    mask = segment_positions_and_mask(segments)[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run_flex(q, k, v, segments):
    return flex(q, k, v, segment_block_mask(segments), enable_gqa=False)


def run_varlen(q, k, v, lengths):
    from torch.nn.attention.varlen import varlen_attn

    b, h, s, d = q.shape
    flat = [t.transpose(1, 2).reshape(b * s, h, d) for t in (q, k, v)]  # (total, heads, dim)
    cu = torch.tensor([0] + [n for row in lengths for n in row], device=q.device).cumsum(0).to(torch.int32)
    longest = max(n for row in lengths for n in row)
    out = varlen_attn(*flat, cu, cu, longest, longest, window_size=(-1, 0))
    return out.view(b, s, h, d).transpose(1, 2)


def measure(fn, inputs, steps: int, backward: bool, device: torch.device) -> tuple[float, int, torch.Tensor]:
    """`timed` attention fn (forward, and backward of its sum) on fresh leaves of q, k, v."""
    def once():
        q, k, v = (t.detach().requires_grad_(backward) for t in inputs[:3])
        with torch.set_grad_enabled(backward):
            out = fn(q, k, v, inputs[3])
            if backward:
                out.float().sum().backward()
        return out.detach()

    return timed(once, steps, device)


def packed_sft_model(a: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The model of the step: built on the meta device, materialised on `device`."""
    from model.llama import build_model
    from model.lora import LoRAConfig, LoRALinear, apply_lora, mark_trainable

    args = ModelArgs(dim=a.heads * a.head_dim, n_layers=a.layers, n_heads=a.heads,
                     vocab_size=a.vocab, max_seq_len=a.seq)
    model = build_model(args, init=False)
    apply_lora(model, LoRAConfig(r=8, alpha=32, dropout=0.0))
    mark_trainable(model, ("tok_embeddings", "output"))
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reset_lora_parameters()
    return model.to(dtype)


def model_rows(a: argparse.Namespace, kinds: list[tuple[str, bool]], device: torch.device,
               dtype: torch.dtype) -> None:
    """The packed SFT step through each attention path: tokens/s, peak memory, loss Δ."""
    model = packed_sft_model(a, device, dtype)
    segments, _ = segments_for(a.batch, a.seq, a.mean_doc, device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen).to(device)
    labels = tokens.roll(-1, dims=1)
    labels[segments != segments.roll(-1, dims=1)] = -100  # nothing predicted across a boundary

    def step(kind: str, backward: bool) -> torch.Tensor:
        model.packed_attention = kind
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            loss = model.loss(tokens, labels, segment_ids=segments, chunk_size=4096)
            if backward:
                loss.backward()
        return loss.detach()

    n = a.batch * a.seq
    print(f"\npacked SFT step: dim {model.args.dim}, {a.layers} layers, vocab {a.vocab:,}, "
          f"LoRA r 8 + embeddings/output, {dtype}")
    print("| model.packed_attention | pass | tokens/s | peak memory (MB) | tokens/s ÷ dense | "
          "memory ÷ dense | loss Δ vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for kind, backward in kinds:
        t, mem, loss = timed(lambda: step(kind, backward), a.steps, device)
        if base is None:
            base = (t, mem, loss)
        ratio_mem = f"{mem / base[1]:.2f}×" if base[1] else "-"
        rel = abs(float(loss) - float(base[2])) / abs(float(base[2]))
        print(f"| {kind} | {'fwd+bwd' if backward else 'fwd'} | {n / t:,.0f} | {mem / 2**20:,.0f} | "
              f"{base[0] / t:.2f}× | {ratio_mem} | {rel:.1e} (relative) |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU (CI)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--mean_doc", type=int, default=300, help="mean document length in tokens")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=2, help="blocks of the packed SFT step's model")
    p.add_argument("--vocab", type=int, default=49954, help="vocabulary of the packed SFT step's model")
    p.add_argument("--no_model", action="store_true", help="the attention alone, not the model step")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.seq, a.heads, a.head_dim, a.mean_doc, a.steps, a.vocab = 2, 256, 4, 16, 40, 2, 512
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    q, k, v = (torch.randn(a.batch, a.heads, a.seq, a.head_dim, device=device, dtype=dtype) for _ in range(3))
    segments, lengths = segments_for(a.batch, a.seq, a.mean_doc, device)
    gpu = device.type == "cuda"
    paths = [("dense mask (SDPA)", run_dense, segments, True),
             ("flex attention (BlockMask)", run_flex, segments, gpu)]
    if gpu:
        paths.append(("varlen (flash)", run_varlen, lengths, True))
    n_docs = sum(len(r) for r in lengths)
    print(f"{device.type}: batch {a.batch} × {a.seq} tokens, {a.heads} heads × {a.head_dim}, "
          f"{n_docs} documents (mean {a.batch * a.seq / n_docs:.0f} tokens), {dtype}")
    base_time = base_mem = reference = None
    print("| attention | pass | time (ms) | peak memory (MB) | time ÷ dense | memory ÷ dense | max |Δ| vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, fn, extra, backward in paths:
        t, mem, out = measure(fn, (q, k, v, extra), a.steps, backward, device)
        if reference is None:
            base_time, base_mem, reference = t, mem, out
        diff = (out.float() - reference.float()).abs().max().item()
        ratio_mem = f"{mem / base_mem:.2f}×" if base_mem else "-"
        print(f"| {name} | {'fwd+bwd' if backward else 'fwd'} | {t * 1e3:.2f} | {mem / 2**20:,.0f} | "
              f"{t / base_time:.2f}× | {ratio_mem} | {diff:.2e} |")
    if not a.no_model:
        kinds = [("sdpa", True), ("flex", gpu)] + ([("varlen", True)] if gpu else [])
        model_rows(a, kinds, device, dtype)


if __name__ == "__main__":
    main()
