#!/bin/bash
# Profiles on the SWA phase (epochs 24-45) of each seed's vgg_small run, chosen on the 5,000
# held-out images; test accuracy once for the choice and once for the uniform average.
# Run from the repository root, after the `ckptavg train ... -o runs/seedS/swa` of
# docs/profiles.md: docs/results/fashion-mnist-vgg/profiles-search.sh S
set -euo pipefail
P="uniform,time,ema:halflife=80,ema:halflife=200,ema:halflife=400,power:sigma_rel=0.05,power:sigma_rel=0.1,power:sigma_rel=0.2,wsm:linear,wsm:minus-sqrt,wsm:cosine"
S=$1
DATA=../shared/data/fashion-mnist
.venv/bin/ckptavg search "runs/seed$S/swa/epoch-*.safetensors" --from-epoch 24 --profiles "$P" \
  --data-dir "$DATA" --test -o "runs/seed$S/best.safetensors" --json -q > "runs/seed$S-profiles.json"
.venv/bin/ckptavg search "runs/seed$S/swa/epoch-*.safetensors" --from-epoch 24 --profiles uniform \
  --data-dir "$DATA" --test --json -q > "runs/seed$S-uniform.json"
