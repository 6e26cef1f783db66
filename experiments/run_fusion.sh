#!/usr/bin/env bash
# The weight-space fusion tables (README "Weight-space fusion"): trains every MLP parent with the
# expert trainer (3 seeds), trains data-free generators and gates on the sharded parents (train_gan.py,
# train_pan.py), then fuses and evaluates them with merge.py. Results under results/fusion/.
# Run from the repository root; the data root is $MOE_DATA_DIR (default ./data).
set -euo pipefail
PY="${PYTHON:-python}"
SEEDS='[770597,600522,416719]'
OUT=results/fusion
MLP='{widths: [256], bias: true}'
train() {  # train TASK ARCH_KWARGS
  "$PY" train_source_networks.py experiments/fusion_parents.yaml dataset="$1" arch=mlp arch_kwargs="$2" \
    seeds="$SEEDS" results_dir="$OUT"
}
for i in 0 1; do train "mnist_shard2_p$i" "$MLP"; done
for k in 2 4 8; do
  for ((i = 0; i < k; i++)); do train "mnist_dir${k}_p$i" "$MLP"; done
done
train mnist '{widths: [400, 200, 100, 50, 25], bias: false}'
train mnist '{widths: [400, 200, 100], bias: false}'
# data-free gates on the sharded parents (fusion_shard2.yaml's gate rows): generators, then gates
"$PY" train_gan.py experiments/fusion_parents.yaml experiments/fusion_shard2.yaml experiments/gan_cpu.yaml \
  problem=mnist_shard2_mlp seeds="$SEEDS" results_dir="$OUT"
"$PY" train_pan.py experiments/fusion_parents.yaml experiments/fusion_shard2.yaml experiments/gan_cpu.yaml \
  problem=mnist_shard2_mlp \
  gate_types='[feature,universal]' regimes='[real,synthetic]' seeds="$SEEDS" results_dir="$OUT"
for table in shard2 noniid2 noniid4 noniid8 clafusion; do
  # gan_cpu.yaml names the generators the shard2 table's data-free gates were trained on
  "$PY" merge.py experiments/fusion_parents.yaml "experiments/fusion_$table.yaml" experiments/gan_cpu.yaml \
    results_dir="$OUT"
done
