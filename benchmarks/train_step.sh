#!/usr/bin/env bash
# resnetlab's training step with default settings against a plain float32 NCHW eager loop, same model, batch, data.
set -euo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
resnetlab bench train --model resnet20 --input-size 32 --batch-size 128 --out "$out/train_resnet20_32.json"
resnetlab bench train --model resnet18_small --input-size 64 --batch-size 128 --out "$out/train_resnet18_small_64.json"
