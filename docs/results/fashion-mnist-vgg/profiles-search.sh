#!/bin/bash
# Profiles on the SWA phase (epochs 24-45) of each seed's vgg_small run, chosen on the 5,000
# held-out images; test accuracy once for the choice and once for the uniform average.
P="uniform,time,ema:halflife=80,ema:halflife=200,ema:halflife=400,power:sigma_rel=0.05,power:sigma_rel=0.1,power:sigma_rel=0.2,wsm:linear,wsm:minus-sqrt,wsm:cosine"
S=$1
cd /work/main
.venv/bin/ckptavg search /work/sci/seed$S/swa/epoch-*.safetensors --from-epoch 24 --profiles "$P" \
  --data-dir /work/shared/data/fashion-mnist --test -o /work/sci/seed$S/best.safetensors --json -q > /work/sci/seed$S-profiles.json
.venv/bin/ckptavg search /work/sci/seed$S/swa/epoch-*.safetensors --from-epoch 24 --profiles uniform \
  --data-dir /work/shared/data/fashion-mnist --test --json -q > /work/sci/seed$S-uniform.json
