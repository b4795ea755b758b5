#!/usr/bin/env bash
# The prepared GPU benchmark: one command, under 8 minutes on one H100/H200, printing each
# comparison side by side as measured in this run.
#
#   bash bench/gpu_suite.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_suite.sh --smoke    # the same code paths at toy size on the CPU (CI)
#
#   (a) 7B-shaped stage 2 (LoRA r 8 on seven projections + embeddings/output, vocab 49,954,
#       seq 512, bf16, activation checkpointing): zhllama vs transformers + peft + a
#       Trainer-equivalent loop, tokens/s and peak memory   (bench/bench_stage2.py)
#   (b) the same with QLoRA (model.quantize: nf4): peak memory
#   (c) packed SFT attention with document masks: flex / varlen vs the dense mask
#                                                             (bench/bench_pack.py)
#   (d) a ~1B-shaped full-training step, compiled and not: MFU against a bf16 matmul
#       measured in the same run                              (bench/bench_full.py)
#   (e) the memory planner's prediction vs the measured peak (torch.cuda.max_memory_allocated)
#       of stage 2, its QLoRA variant and full training, at LLaMA-7B's width and
#       vocabulary on 2 layers                                  (bench/bench_plan.py)
# The 7B shape keeps the width and vocabulary of LLaMA-7B with 8 of its 32 layers, so the
# whole suite fits the time; per-layer figures and every ratio are those of the full model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

"$PY" - <<'EOF'
import datetime, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
print(f"# zhllama GPU suite, {datetime.date.today()}: {gpu}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, Python {platform.python_version()}")
EOF

if [[ $SMOKE == 1 ]]; then
    STAGE2=(--size tiny --vocab 600 --batch 2 --seq 64 --steps 1 --device cpu --precision fp32)
    PACK=(--smoke)
    FULL=(--smoke)
    PLAN=(--dim 64 --layers 2 --vocab 512 --seq 64 --only "stage 2, none")
else
    STAGE2=(--size llama-7b --n_layers 8 --vocab 49954 --batch 4 --seq 512 --steps 5)
    PACK=()
    FULL=()
    PLAN=(--device cuda --dim 4096 --layers 2 --vocab 49954 --seq 512
          --only "stage 2 (LoRA + vocabulary), bf16" --only "stage 2 QLoRA, bf16" --only "full, checkpointed")
fi

echo; echo "## (a) stage 2: zhllama vs transformers + peft"
"$PY" bench/bench_stage2.py "${STAGE2[@]}"
echo; echo "## (b) stage 2 with QLoRA (NF4 base weights): zhllama"
"$PY" bench/bench_stage2.py "${STAGE2[@]}" --sides ours --ours=--model.quantize=nf4
echo; echo "## (c) packed SFT attention with document masks"
"$PY" bench/bench_pack.py "${PACK[@]}"
echo; echo "## (d) full training, ~1B shape, compiled and not"
"$PY" bench/bench_full.py "${FULL[@]}"
echo; echo "## (e) the memory planner's prediction vs the measured peak"
"$PY" bench/bench_plan.py "${PLAN[@]}"
