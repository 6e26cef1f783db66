#!/usr/bin/env bash
# DAFL as its reference defines it (config.py: entropy in log base 10, generator BatchNorm eps 0.8, samples
# drawn in training mode) against the earlier behaviour (natural log, eps 1e-5, eval-mode sampling), one
# seed of disjoint_mnist at the cpu profile's DAFL budget: generators, their image sets, the data-free gates
# on them, and the gates table for each. Writes results/ablations/dafl_legacy/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/ablations/dafl_legacy
SEED="seeds=[770597]"
BUDGET="dafl.epochs=8 dafl.iters_per_epoch=50 dafl.batch_size=128 dafl.width=32"
LEGACY="dafl.entropy_base=2.718281828 dafl.bn_eps=1e-5 dafl.sample_mode=eval"
GATES="strategies=[naive,gate_hard(gate=feature,regime=synthetic),gate_hard(gate=logits,regime=synthetic),gate_hard(gate=agnostic_logits,regime=synthetic),gate_hard(gate=agnostic_feature,regime=synthetic),gate_hard(gate=universal,regime=synthetic),gate_soft(gate=universal,regime=synthetic)]"
python train_gan.py problem=disjoint_mnist "$SEED" "synthesizers=[dafl]" $BUDGET $LEGACY results_dir=$OUT
python train_pan.py problem=disjoint_mnist "$SEED" "regimes=[synthetic]" "synthesizers=[dafl]" $BUDGET $LEGACY results_dir=$OUT
for variant in reference legacy; do
  extra=$([ $variant = legacy ] && echo "$LEGACY" || true)
  python merge.py problem=disjoint_mnist name=dafl_$variant "$SEED" "$GATES" $BUDGET $extra results_dir=$OUT
done
