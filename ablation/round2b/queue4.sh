#!/bin/bash
# after the first full run: its FID-2k, the test suite, the second seed and its FID-2k, the sampling study, the base's FID-2k
cd /work/runs; source /work/main/.venv/bin/activate
while pgrep -f "full_run.sh auto_s1337" > /dev/null; do sleep 10; done
FID="python /work/final2/fid.py --num_samples=2000 --ref=cifar10-jpg-test-fid-stats.npz --compile=True --batch_size=100 --mlflow_log=False"
t0=$(date +%s); $FID --ckpt=full/auto_s1337/ckpt.pt > full/auto_s1337.fid.log 2>&1; echo "auto_s1337 fid2k $(grep -o 'FID [0-9.]*' full/auto_s1337.fid.log) $(( $(date +%s)-t0 )) s" >> full/runs.log
(cd /work/testsnap && t0=$(date +%s) && python -m pytest -n 2 --dist loadfile -q > /work/runs/pytest.log 2>&1; echo "pytest rc $? $(( $(date +%s)-t0 )) s" >> /work/runs/pytest.log)
CODE=/work/final ./full_run.sh auto_s1338 --seed=1338
t0=$(date +%s); $FID --ckpt=full/auto_s1338/ckpt.pt > full/auto_s1338.fid.log 2>&1; echo "auto_s1338 fid2k $(grep -o 'FID [0-9.]*' full/auto_s1338.fid.log) $(( $(date +%s)-t0 )) s" >> full/runs.log
G=full/auto_s1337/ckpt_0.pt
python /work/measure/ablation/round2b/sampling.py full/auto_s1337/ckpt.pt 1000 "cfg=2 guide=$G" "cfg=1.75 guide=$G" "cfg=2.5 guide=$G" "cfg=2 guide=$G sampler=dpm++2m" "cfg=2 guide=$G steps=10" "cfg=2 guide=$G interval=0.2,0.8" > study2.log 2>&1
t0=$(date +%s); $FID --ckpt=full/auto_s1337/ckpt.pt --autoguidance=False --cfg_scale=1.5 > full/base_fid2k.log 2>&1; echo "auto_s1337 as round 1 (cfg 1.5, no guide) fid2k $(grep -o 'FID [0-9.]*' full/base_fid2k.log) $(( $(date +%s)-t0 )) s" >> full/runs.log
