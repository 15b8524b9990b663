#!/bin/bash
# guid.sh CKPT: sampling-only rows on one checkpoint: FID-1k (DDIM 20 steps unless given) for guidance scale x interval
cd /work/runs
ck=$1
while read -r name args; do
  [ -z "$name" ] && continue
  t0=$(date +%s)
  res=$(/work/main/.venv/bin/python /work/exp/fid.py --ckpt=$ck --num_samples=1000 --ref=cifar10-jpg-test-fid-stats.npz \
      --dtype=bfloat16 --compile=True --batch_size=100 --mlflow_log=False $args 2>&1 | grep -E "^FID|error")
  echo -e "$name\t$res\t$(( $(date +%s) - t0 )) s\t$args" >> guid_rows.log
done <<'ROWS'
g1_cfg1.5_interval --cfg_scale=1.5 --cfg_interval=0.22,0.84
g2_cfg2.0 --cfg_scale=2.0
g3_cfg2.0_interval --cfg_scale=2.0 --cfg_interval=0.22,0.84
g4_cfg3.0_interval --cfg_scale=3.0 --cfg_interval=0.22,0.84
ROWS
