#!/usr/bin/env bash
# The gtsrb-fast recipe end to end on the track-grouped split of gtsrb-dev (the official test set is not here).
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-benchmarks/results}
resnetlab train --recipe gtsrb-fast --data "gtsrb:$data/gtsrb-dev" --out "$out/gtsrb-fast" --overwrite --quiet
python3 -c "import json,sys; m=json.load(open('$out/gtsrb-fast/eval/metrics.json')); i=json.load(open('$out/gtsrb-fast/run_info.json')); print(f\"test top-1 {m['top1']:.4f} on {m['num_samples']} images; {i['train_seconds']:.0f} s of training\")"
