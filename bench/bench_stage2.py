"""Stage-2 training step (LoRA r 8 on all seven projections + embeddings and output trained):
zhllama vs transformers + peft with a minimal HF-Trainer-equivalent loop, same batch.

Meant for a GPU (7B shape, bf16, 512 tokens):

    python bench/bench_stage2.py --size llama-7b --vocab 49953 --batch 4 --seq 512

and runnable on CPU at a tiny size to check it works:

    python bench/bench_stage2.py --size tiny --device cpu --precision fp32 --steps 2

zhllama: its own trainer path — FSDP2 over a group of one, frozen base stored bf16, LoRA and
the trained embeddings in fp32 master weights computed in bf16, full activation
checkpointing, chunked loss. transformers + peft: LlamaForCausalLM in bf16, peft LoRA
(adapters fp32, as peft casts them), `modules_to_save=[embed_tokens, lm_head]`, gradient
checkpointing, autocast bf16, `outputs.loss` — what HF Trainer does for this setup, minus
its bookkeeping. Both use the same weights, batch and AdamW. Prints step time, tokens/s,
peak memory, MFU and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from memory import timed  # bench/memory.py, beside this script

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def random_state(args, seed: int) -> dict[str, torch.Tensor]:
    """Shared random base weights (bf16), made on the CPU so both sides get the same."""
    from model.llama import build_model

    torch.manual_seed(seed)
    model = build_model(args, init=False)
    model.to_empty(device="cpu")
    model.init_weights()
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def run_ours(a, args, state, tokens, labels) -> dict:
    import tempfile
    from pathlib import Path

    from model.formats import write_model_dir
    from model.source import from_state_dict
    from train.config import load_config
    from train.distributed import setup
    from train.optim import LossScaler, build_optimizer
    from train.metrics import flops_per_token
    from train.stages import build_for_stage
    from train.trainer import step_options, train_step

    with tempfile.TemporaryDirectory() as tmp:
        write_model_dir(from_state_dict(state, args), Path(tmp) / "m", progress=False)
        cfg = load_config(None, [
            f"--model.path={Path(tmp) / 'm'}", "--data.path=unused", "--stage=lora",
            "--model.dtype=bfloat16" if a.precision != "fp32" else "--model.dtype=float32",
            f"--parallel.precision={a.precision}", "--parallel.activation_checkpointing=full",
            "--parallel.loss_chunk_size=4096", "--lora.dropout=0.0", *a.ours])
        dist = setup("auto" if a.device == "cuda" else "gloo")
        built = build_for_stage(cfg, dist)
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = build_optimizer(built.model, cfg.optim)
    micro = [{"tokens": tokens, "labels": labels}]
    losses = []

    def step():
        losses.append(train_step(built.model, micro, params, step_options(cfg, built), dist, LossScaler(False))[0])
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, peak, _ = timed(step, a.steps, dist.device)
    return {"step_s": t, "peak_bytes": peak, "first_loss": losses[0],
            "flops_per_token": flops_per_token(built.model, a.seq)}


def run_hf(a, args, state, tokens, labels) -> dict:
    import peft
    import transformers

    from model.formats.hf import canonical_to_hf_name, hf_config, permute_to_hf

    device = torch.device(a.device)
    dtype = torch.float32 if a.precision == "fp32" else torch.bfloat16
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(args, dtype, None).items()
                                      if k not in ("architectures", "model_type")})
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    heads = {"wq": args.n_heads, "wk": args.kv_heads}
    hf_state = {}
    for name, t in state.items():
        kind = name.split(".")[-2]
        hf_state[canonical_to_hf_name(name)] = permute_to_hf(t, heads[kind]) if kind in heads else t
    model.load_state_dict(hf_state, strict=False)  # copies (and casts) into place
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS,
                           modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    for p in model.parameters():  # trained weights in fp32, as the Trainer keeps them
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.95), weight_decay=0.01)
    hf_labels = torch.cat([tokens[:, :1], labels[:, :-1]], dim=1)  # HF shifts labels itself
    hf_labels[:, 0] = -100

    losses = []

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=tokens, labels=hf_labels).loss
        losses.append(float(loss))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, peak, _ = timed(step, a.steps, device)
    return {"step_s": t, "peak_bytes": peak, "first_loss": losses[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="llama-7b", help="a named size (model.llama.MODEL_SIZES)")
    p.add_argument("--n_layers", type=int, help="fewer layers of the size's width (default: all)")
    p.add_argument("--sides", default="ours,hf", help="which to run: ours, hf or both (default)")
    p.add_argument("--ours", action="append", default=[], metavar="--KEY=VALUE",
                   help="a training-config override for our side (e.g. --ours=--model.quantize=nf4)")
    p.add_argument("--vocab", type=int, default=49953)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="per device (H100 SXM bf16 dense)")
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    a = p.parse_args()
    from model.llama import named_args

    extra = {"n_layers": a.n_layers} if a.n_layers else {}
    args = named_args(a.size, vocab_size=a.vocab, max_seq_len=max(a.seq, 512), **extra)
    if a.worker is None:  # each side in its own process: clean memory statistics
        results, failed = {}, []
        for which in a.sides.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", which]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:  # report it, and still measure the other side
                print(f"{which} failed (exit status {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
                failed.append(which)
                continue
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        report(a, args, results.get("ours"), results.get("hf"))
        if failed:
            sys.exit(1)
        return
    state = random_state(args, seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    run = run_ours if a.worker == "ours" else run_hf
    print(json.dumps(run(a, args, state, tokens, labels)))


def report(a, args, ours: dict | None, hf: dict | None) -> None:
    tokens = a.batch * a.seq
    fpt = (ours or {}).get("flops_per_token")
    setting = " ".join(a.ours)
    print(f"stage 2 step: {a.size}{f' ({args.n_layers} layers)' if a.n_layers else ''} (vocab {a.vocab}), "
          f"batch {a.batch} x {a.seq}, {a.precision}, LoRA r 8 on 7 projections + embeddings/output, "
          f"activation checkpointing, {a.device}{'; ours with ' + setting if setting else ''}")
    print(f"{'':22s}{'step (s)':>10s}{'tokens/s':>10s}{'peak GB':>9s}{'MFU':>7s}")
    for name, r in (("zhllama", ours), ("transformers + peft", hf)):
        if r is None:
            continue
        mfu = f"{fpt * tokens / r['step_s'] / (a.peak_tflops * 1e12):7.1%}" if fpt else ""
        print(f"{name:22s}{r['step_s']:10.3f}{tokens / r['step_s']:10.0f}{r['peak_bytes'] / 1e9:9.1f}{mfu}")
    if ours and hf:
        print(f"first-step loss: zhllama {ours['first_loss']:.5f}, transformers+peft {hf['first_loss']:.5f} "
              "(same weights and batch: they must agree)")
        print(f"ratio zhllama / transformers+peft: time {ours['step_s'] / hf['step_s']:.2f}x"
              + (f", memory {ours['peak_bytes'] / hf['peak_bytes']:.2f}x" if hf["peak_bytes"] else ""))


if __name__ == "__main__":
    main()
