#!/bin/bash
cd /work/runs; source /work/main/.venv/bin/activate

B=full/base_s1337
python /work/measure/ablation/round2b/sampling.py $B/ckpt.pt 1000 "cfg=1.5" "cfg=2" "cfg=1.5 guide=$B/ckpt_0.pt" "cfg=2 guide=$B/ckpt_0.pt" "cfg=3 guide=$B/ckpt_0.pt" "cfg=2 guide=$B/ckpt_1.pt" "cfg=1.5 eta=0.5" "cfg=1.5 eta=1" "cfg=1.5 steps=10" "cfg=1.5 steps=40" > study1.log 2>&1
