#!/usr/bin/env bash
# The convolutional weight-space fusion tables (README "Fusion of convolutional networks"): trains the VGG-style
# CIFAR-10 parents (non-IID K = 2 and 4, sharded K = 2, and two depths on all of CIFAR-10) and the LeNet5 parents
# on MNIST's two halves with the expert trainer (3 seeds), then fuses and evaluates them with merge.py.
# Results under results/fusion_cnn/. Run from the repository root; the data root is $MOE_DATA_DIR (default ./data).
# fusion_cnn.yaml and fusion_cnn_full.yaml hold the VGG parents' recipes (and say why they differ from the
# experts' defaults); merge.py reads the same file to find the checkpoints.
set -euo pipefail
PY="${PYTHON:-python}"
SEEDS='[770597,600522,416719]'
OUT=results/fusion_cnn
VGG='{layers: [16, M, 32, M, 64, M], hidden: [128]}'
VGG_DEEP='{layers: [16, M, 32, M, 64, 64, M], hidden: [128, 64]}'
train() {  # train RECIPE_YAML TASK ARCH [ARCH_KWARGS]
  "$PY" train_source_networks.py experiments/fusion_parents.yaml "$1" dataset="$2" arch="$3" \
    ${4:+arch_kwargs="$4"} seeds="$SEEDS" results_dir="$OUT"
}
for i in 0 1; do train experiments/fusion_cnn.yaml "cifar10_dir2_p$i" vgg "$VGG"; done
for i in 0 1 2 3; do train experiments/fusion_cnn.yaml "cifar10_dir4_p$i" vgg "$VGG"; done
for i in 0 1; do train experiments/fusion_cnn.yaml "cifar10_shard2_p$i" vgg "$VGG"; done
for i in 0 1; do train experiments/fusion_parents.yaml "mnist_shard2_p$i" lenet5; done  # the defaults
train experiments/fusion_cnn_full.yaml cifar10 vgg "$VGG"
train experiments/fusion_cnn_full.yaml cifar10 vgg "$VGG_DEEP"
merge() {  # merge RECIPE_YAML TABLE_YAML
  "$PY" merge.py experiments/fusion_parents.yaml "$1" "$2" results_dir="$OUT"
}
for table in noniid2 noniid4 shard2; do merge experiments/fusion_cnn.yaml "experiments/fusion_cnn_$table.yaml"; done
merge experiments/fusion_cnn_full.yaml experiments/fusion_cnn_clafusion.yaml
merge experiments/fusion_parents.yaml experiments/fusion_lenet_shard2.yaml
