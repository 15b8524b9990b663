#!/bin/bash
# The fourth session's full-budget checks, seed 1337, run from /work/runs (the data, the statistics, full_run.sh),
# one job at a time, each against the config's own seed-1337 model (FID-2k 34.84; FID-1k 50.2, 51.2 at scale 1.5):
# 1. the model's shape: 6 x 384 (6 heads of 64), 0.48x the images/s of 6 x 256 (ab_speed.py, 6 rounds), so 1,140
#    iterations in the same time, with the evaluations, the guide and the warm-up at the same fractions of the run
# 2. the learning rate decayed linearly to zero instead of a cosine to 4e-4 (lr_decay=linear, min_lr=0)
cd /work/runs; source /work/main/.venv/bin/activate
S=/work/measure/ablation/round2b/sampling.py
python /work/measure/ablation/round2b/ab_speed.py 6 base "w320 n_embd=320 n_head=5" "w384 n_embd=384 n_head=6" \
  "d8 n_layer=8" "h8 n_head=8" "w192 n_embd=192 n_head=3"
bash full_run.sh w384_s1337 --n_embd=384 --n_head=6 --max_iters=1140 --eval_interval=380 --guide_iter=380 \
  --warmup_iters=100                                  # ckpt_0.pt, ckpt_1.pt: the copies at iterations 380 and 760
python $S full/w384_s1337/ckpt.pt 2000 "cfg=2 guide=full/w384_s1337/ckpt_0.pt guidenull=1"
CODE=/work/measure bash full_run.sh lin0_s1337 --lr_decay=linear --min_lr=0   # ckpt_0.pt: the copy at iteration 800
python $S full/lin0_s1337/ckpt.pt 2000 "cfg=2 guide=full/lin0_s1337/ckpt_0.pt guidenull=1"
# the wider model's guide re-tuned, FID-1k: a guide from two thirds of the run, and the guide of a third at scale 1.5
python $S full/w384_s1337/ckpt.pt 1000 "cfg=2 guide=full/w384_s1337/ckpt_1.pt guidenull=1" \
  "cfg=1.5 guide=full/w384_s1337/ckpt_0.pt guidenull=1"
# 3. 6 x 192 (3 heads of 64), 4,080 iterations (1.71x by ab_speed; the steps ran 1.54x: ~10% over the budget)
bash full_run.sh w192_s1337 --n_embd=192 --n_head=3 --max_iters=4080 --eval_interval=1360 --guide_iter=1360 \
  --warmup_iters=340
python $S full/w192_s1337/ckpt.pt 2000 "cfg=2 guide=full/w192_s1337/ckpt_0.pt guidenull=1"
