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
#   (c) packed SFT with document masks: flex / varlen vs the dense mask, the attention
#       alone and a packed SFT step through each model.packed_attention  (bench/bench_pack.py)
#   (d) a ~1B-shaped full-training step, compiled and not: MFU against a bf16 matmul
#       measured in the same run                              (bench/bench_full.py)
#   (e) the memory planner's prediction vs the measured peak (torch.cuda.max_memory_allocated)
#       of stage 2, its QLoRA variant and full training, at LLaMA-7B's width and
#       vocabulary on 2 layers                                  (bench/bench_plan.py)
# The 7B shape keeps the width and vocabulary of LLaMA-7B with 8 of its 32 layers, so the
# whole suite fits the time; per-layer figures and every ratio are those of the full model.
# Each section runs under its own time limit, and one that fails or runs out of time is
# reported and the next one runs: a machine lent for minutes must not lose the whole table
# to one error. The exit status is non-zero if any section failed.
#
# Needs torch, transformers and peft, and torchao for (b); it runs from a checkout that was
# never pip-installed (the repository root goes on PYTHONPATH). PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

"$PY" - <<'PYEOF' || exit 1
import datetime, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
versions = []
for name in ("transformers", "peft", "torchao"):
    try:
        versions.append(f"{name} {__import__(name).__version__}")
    except ImportError:
        versions.append(f"{name} missing")
print(f"# zhllama GPU suite, {datetime.date.today()}: {gpu}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, Python {platform.python_version()}; {', '.join(versions)}")
PYEOF

if [[ $SMOKE == 1 ]]; then
    STAGE2=(--size tiny --vocab 600 --batch 2 --seq 64 --steps 1 --device cpu --precision fp32)
    PACK=(--smoke)
    FULL=(--smoke)
    PLAN=(--dim 64 --layers 2 --vocab 512 --seq 64 --only "stage 2, none")
    LIMITS=(900 900 900 900 900)
else
    STAGE2=(--size llama-7b --n_layers 8 --vocab 49954 --batch 4 --seq 512 --steps 5)
    PACK=()
    FULL=()
    PLAN=(--device cuda --dim 4096 --heads 32 --layers 2 --vocab 49954 --seq 512
          --only "stage 2 (LoRA + vocabulary), bf16" --only "stage 2 QLoRA, bf16" --only "full, checkpointed")
    # seconds per section, (a) to (e): 8 minutes in all
    LIMITS=(140 65 75 105 95)
fi

FAILED=()
section() {  # section TITLE LIMIT COMMAND...
    local title=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo; echo "## $title"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [[ $rc == 124 || $rc == 137 ]]; then
        echo "(stopped: over its ${limit} s; the suite goes on)"
    elif [[ $rc != 0 ]]; then
        echo "(failed with exit status $rc; the suite goes on)"
    fi
    [[ $rc == 0 ]] || FAILED+=("${title%% *}")
    echo "(${title%% *} took $((SECONDS - start)) s)"
}

section "(a) stage 2: zhllama vs transformers + peft" "${LIMITS[0]}" \
    "$PY" bench/bench_stage2.py "${STAGE2[@]}"
section "(b) stage 2 with QLoRA (NF4 base weights): zhllama" "${LIMITS[1]}" \
    "$PY" bench/bench_stage2.py "${STAGE2[@]}" --sides ours --ours=--model.quantize=nf4
section "(c) packed SFT with document masks: attention, then the model's step" "${LIMITS[2]}" \
    "$PY" bench/bench_pack.py "${PACK[@]}"
section "(d) full training, ~1B shape, compiled and not" "${LIMITS[3]}" \
    "$PY" bench/bench_full.py "${FULL[@]}"
section "(e) the memory planner's prediction vs the measured peak" "${LIMITS[4]}" \
    "$PY" bench/bench_plan.py "${PLAN[@]}"

echo
if (( ${#FAILED[@]} )); then
    echo "# failed: ${FAILED[*]} (of 5 sections, ${SECONDS} s)"
    exit 1
fi
echo "# all 5 sections ran (${SECONDS} s)"
