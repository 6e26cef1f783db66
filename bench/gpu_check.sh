#!/usr/bin/env bash
# The GPU check: everything this project measures on a CUDA machine, in one prepared run of about 8 minutes.
#
#   bash bench/gpu_check.sh OUT_DIR [DATA_DIR]
#
# For a machine with Python 3.12, torch 2.11 and torchvision 0.26 preinstalled, no network and no pip (POT
# and Captum absent: their tests skip with the reason). The data root needs MNIST only (torchvision's
# layout, MNIST/raw); with the device tool, copy it into an ignored folder of the repository and carry it:
#   mkdir -p .carry/data && cp -r data/MNIST .carry/data/   # then run with carry: [".carry"]
# Writes into OUT_DIR, each step with its own time limit so one slow step cannot eat the others' time:
#   env.txt                  Python, torch, torchvision, the GPU (nvidia-smi)
#   tests.txt                the test modules that run on CUDA (rules, stacked networks, augmentations, synthesis)
#   bench_vectorised.*       10 seeds x 10 epochs of LeNet5 on MNIST, stacked vs one by one (target: stacked < 5 s)
#   dafl_step.*              one DAFL step at the paper's size, batch 512, full width (target: < 10 ms)
#   paper_seed.txt, paper_seed/report.md   one seed of disjoint_mnist at the paper's budgets end to end, with the
#                            wall time per stage (target: < 5 minutes)
#   summary.txt              the wall time of each step
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [DATA_DIR]}
DATA=${2:-${MOE_DATA_DIR:-.carry/data}}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export MOE_DATA_DIR="$DATA"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, record its wall time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local code=$?
  echo "$name: exit $code, $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
step env 30 bash -c "$PY -c 'import sys, torch, torchvision; print(sys.version); print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"cuda\", torch.cuda.is_available())' && nvidia-smi"
if $PY -c "import pytest" 2>/dev/null; then
  step tests 120 "$PY" -m pytest -q tests/test_strategies.py tests/test_stacked.py tests/test_augments.py \
    tests/test_synthesis.py
else
  echo "pytest is not installed here: the CUDA tests were not run" | tee "$OUT/tests.txt" >> "$OUT/summary.txt"
fi
step bench_vectorised 120 "$PY" bench/bench_vectorised.py --seeds 10 --expert-epochs 10 --parts experts --rounds 1 \
  --device cuda --data-dir "$DATA" --out "$OUT/bench_vectorised.json"
step dafl_step 60 "$PY" bench/bench_dafl_step.py --device cuda --out "$OUT/dafl_step.json"
step paper_seed 300 "$PY" experiments/reproduce.py profile=paper "seeds=[770597]" "only_problems=[disjoint_mnist]" \
  device=cuda "data_dir=$DATA" "ckpt_dir=$OUT/paper_ckpt" "results_dir=$OUT/paper_seed"
rm -rf "$OUT/paper_ckpt"  # checkpoints stay on the machine: the results and the report come back
