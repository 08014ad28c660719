#!/usr/bin/env bash
# The input pipeline's images/s against the training step's consumption, on the real development data.
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
resnetlab bench data --data "gtsrb:$data/gtsrb-dev" --recipe gtsrb-fast --json > "$out/data_gtsrb_32.json"
resnetlab bench data --data "folder:$data/cifar10-dev" --recipe cifar10-resnet20 --json > "$out/data_cifar10_32.json"
resnetlab bench data --data "folder:$data/imagenette-dev" --recipe imagenet-resnet50 --steps 3 --json > "$out/data_imagenette_224.json"
