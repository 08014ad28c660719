#!/usr/bin/env bash
# Inference backends side by side (`resnetlab bench infer`): ResNet-20 at 32 px trained on gtsrb-dev and resnet50 at
# 224 px trained on imagenette-dev. The runs are short: speed does not depend on how well a model is trained (the int8
# accuracy change does, so read it with the model's own accuracy in mind).
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
resnetlab train --data "gtsrb:$data/gtsrb-dev" --epochs 3 --out "$out/infer-resnet20" --overwrite --quiet
resnetlab bench infer "$out/infer-resnet20" --rounds 7 --latency-calls 210 --out "$out/infer_resnet20_32.json"
resnetlab train --data "folder:$data/imagenette-dev" --model resnet50 --epochs 4 --batch-size 16 \
    --out "$out/infer-resnet50" --overwrite --quiet data.input_size=224 data.resize=shorter_crop \
    data.normalize=imagenet augment.preset=imagenet data.split=stratified eval.gradcam=false
resnetlab bench infer "$out/infer-resnet50" --latency-calls 100 --out "$out/infer_resnet50_224.json"
