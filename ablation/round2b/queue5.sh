#!/bin/bash
cd /work/runs; source /work/main/.venv/bin/activate
G=full/auto_s1337/ckpt_0.pt
python /work/measure/ablation/round2b/sampling.py full/auto_s1337/ckpt.pt 1000 "cfg=2 guide=$G seed=1" "cfg=2 guide=$G interval=0.2,0.8 seed=1" > study3.log 2>&1
cd /work/main && python -m pytest -n 2 --dist loadfile -q > /work/runs/pytest2.log 2>&1; echo "pytest rc $?" >> /work/runs/pytest2.log
