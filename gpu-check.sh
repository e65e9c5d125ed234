#!/usr/bin/env bash
# The device check, for a machine with one CUDA GPU (under ten minutes on an H100): the CUDA tests,
# the training step's speed eager and captured (`research bench`), then the students of the single
# command at full scale on ML-100K, each stage timed. The LLM teacher's stages (fine-tuning, every
# training row) need llama-cpp-python built for CUDA and the GGUF model there; where they are missing
# the students learn from the trained-model teacher (model_teacher.py), which needs torch alone.
# Needs torch with CUDA, numpy, pytest, and MovieLens-100K at $DLLM2REC_ML100K (or ML100K=folder).
# Usage: OUT=folder ./gpu-check.sh   (figures and logs go to $OUT; timings.txt lists the stages)
set -uo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export DLLM2REC_CACHE="$OUT/cache" DLLM2REC_ML100K=${ML100K:-${DLLM2REC_ML100K:?set DLLM2REC_ML100K to an ml-100k folder}}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
stage() {   # name, seconds allowed, then the command: its log in $OUT/name.log, its time in timings.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-14s %5d s  exit %s\n' "$name" "$((SECONDS - t0))" "$rc" | tee -a "$OUT/timings.txt"
}
stage cuda-tests 90 python -m pytest -q -rs test_dllm2rec.py -k "cuda or captured"
stage bench 60 python -m research bench --device cuda --students sasrec,dros --out "$OUT/bench.json"
stage model-teacher 120 python -m research model-teacher --dataset ml-100k --device cuda --out "$OUT/model-teacher"
stage students 300 python dllm2rec.py train --dataset ml-100k --device cuda --teacher "$OUT/model-teacher" \
  --students gru4rec,sasrec,cl4srec,dros,caser --seeds 3 --epochs 300 --out "$OUT/students.json"
