#!/usr/bin/env bash
# A GTSRB model meets Belgian signs: zero-shot, after label-free adaptation (AdaBN, TENT), after 10-shot
# fine-tuning, and the operating point's coverage and error there. The figures in docs/recipes.md ("New domain:
# Belgian signs") come from this script.
#
#   bash benchmarks/new_domain_belgium.sh RUN_DIR [OUT_DIR]
#
# RUN_DIR is a GTSRB run (e.g. `resnetlab train --recipe gtsrb-robust --data gtsrb:../shared/data/gtsrb-train`);
# BELGIUM (default ../shared/data/signs-belgium) holds labels.csv (Path,ClassId,SourceLabel). Every model is
# measured on the same images: those that the 10-shot draw leaves for testing (rest.csv), so that zero-shot,
# adapted and fine-tuned figures compare like with like. The adaptation uses those images without their labels,
# as a deployed model would adapt to the stream it classifies.
set -euo pipefail
RUN=${1:?usage: new_domain_belgium.sh RUN_DIR [OUT_DIR]}
OUT=${2:-$RUN-belgium}
BELGIUM=${BELGIUM:-../shared/data/signs-belgium}
SHOTS=${SHOTS:-10}
mkdir -p "$OUT"

# frames of one Belgian sign share a track number in their file name: keep them on one side of the draw
resnetlab data sample "csv:$BELGIUM/labels.csv" --per-class "$SHOTS" --seed 0 --split-test \
    --group-pattern '^(.*)_\d+\.\w+$' --out "$OUT/sample"
TEST="csv:$OUT/sample/rest.csv"

resnetlab evaluate "$RUN" --data "$TEST" --out "$OUT/zero-shot" --overwrite
for method in adabn tent; do
    resnetlab adapt "$RUN" --data "$TEST" --method "$method" --out "$OUT/$method.pt" --overwrite
    resnetlab evaluate "$OUT/$method.pt" --data "$TEST" --out "$OUT/$method" --overwrite
done
# 10 labelled images per class: train on the shots (a fifth of them for validation), test on the rest
resnetlab train --recipe finetune-new-domain --init-from "$RUN" --data "csv:$OUT/sample/split.csv" \
    --out "$OUT/finetune" --overwrite
resnetlab compare "$RUN" "$OUT/zero-shot" "$OUT/finetune" --out "$OUT/compare"
