#!/usr/bin/env bash
# Does search --sweep's choice beat the fixed SWA window on the test set? (issue #38)
# Run from the repository root: bash docs/results/sweep-fashion-mnist/run.sh
# Writes runs-sweep/seedS (16 epochs of convnet_bn on the first 10,000 Fashion-MNIST training
# images, the next 2,000 held out) and prints one line per seed.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=../shared/data/fashion-mnist
for seed in 0 1 2; do
  run=runs-sweep/seed$seed
  [ -e "$run/epoch-0016.safetensors" ] || $PY -m ckptavg train --model convnet_bn --data fashion-mnist \
      --data-dir $DATA --epochs 16 --swa-start 8 --lr 0.05 --swa-lr 0.01 --train-images 12000 \
      --holdout 2000 --eval-every 0 --seed $seed --torch-threads 2 -o $run -q
  # the fixed SWA window: every epoch of the SWA phase (9..16)
  $PY -m ckptavg average "$run/epoch-*.safetensors" --from-epoch 9 -o $run/swa.safetensors -q
  $PY -m ckptavg bn-fix $run/swa.safetensors -o $run/swa-bn.safetensors -q
  fixed=$($PY -m ckptavg eval $run/swa-bn.safetensors --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])')
  # windows of 4 epochs sliding along the whole run, chosen on the 2000 held-out images
  $PY -m ckptavg search "$run/epoch-*.safetensors" --sweep window=4 -o $run/sweep-best.safetensors \
      --plot $run/sweep.png --test --json > $run/sweep.json
  $PY - "$run" "$fixed" <<'PYEOF'
import json, sys
run, fixed = sys.argv[1], float(sys.argv[2])
r = json.load(open(f"{run}/sweep.json"))
b = r["best"]
print(f"{run}: sweep chose epochs {b['start_epoch']}-{b['end_epoch']} (held-out {b['holdout_accuracy']:.2f} %), "
      f"test {r['test_accuracy']:.2f} %; fixed SWA window 9-16 test {fixed:.2f} %; "
      f"difference {r['test_accuracy'] - fixed:+.2f}")
PYEOF
done
