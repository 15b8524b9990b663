#!/bin/bash
# The third session's full-budget checks, run from /work/runs (the data, the statistics, full_run.sh), one job at a time:
# 1. the class in adaLN (row 11) at the full budget, two seeds, each scored at FID-2k with the kept sampling
# 2. the config's own two models (full/auto_s1337, full/auto_s1338) with a guidance interval, then DPM-Solver++(2M)
cd /work/runs; source /work/main/.venv/bin/activate
fid2k() {  # NAME [more sampling.py keys]
  python /work/measure/ablation/round2b/sampling.py full/$1/ckpt.pt 2000 "cfg=2 guide=full/$1/ckpt_0.pt guidenull=1 $2"
}
for s in 1337 1338; do
  CODE=/work/measure bash full_run.sh adaln_s$s --class_adaln=True --seed=$s   # ckpt_0.pt: the copy at iteration 800
  fid2k adaln_s$s
done
for keys in "interval=0.2,0.8" "sampler=dpm++2m"; do
  for s in 1337 1338; do fid2k auto_s$s "$keys"; done
done
