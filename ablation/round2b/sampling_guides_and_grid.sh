#!/bin/bash
# study 4: the guide (iteration, raw weights, told no class) and DDIM's time grid, on the round-2 seed-1337 model
cd /work/runs; source /work/main/.venv/bin/activate
while pgrep -f "train.py" > /dev/null; do sleep 10; done
S=/work/measure/ablation/round2b/sampling.py
M=full/auto_s1337
python $S $M/ckpt.pt 1000 "cfg=2 guide=full/prefix_s1337/ckpt_1.pt" "cfg=1.5 guide=full/prefix_s1337/ckpt_1.pt" \
  "cfg=2 guide=full/prefix_s1337/ckpt_2.pt" "cfg=2 guide=$M/ckpt_0.pt guidenull=1" "cfg=1.5 guide=$M/ckpt_0.pt guidenull=1" \
  "cfg=2 guide=$M/ckpt_0.pt guideraw=1" "cfg=2 guide=$M/ckpt_0.pt shift=0.7" "cfg=2 guide=$M/ckpt_0.pt shift=1.5"
python $S $M/ckpt.pt@raw 1000 "cfg=2 guide=$M/ckpt_0.pt"
#!/bin/bash
# study 5: autoguidance with the guide told no class, its scale and a second noise seed
cd /work/runs; source /work/main/.venv/bin/activate
while pgrep -f "study4.sh" > /dev/null; do sleep 10; done
S=/work/measure/ablation/round2b/sampling.py
M=full/auto_s1337
python $S $M/ckpt.pt 1000 "cfg=2 guide=$M/ckpt_0.pt guidenull=1 seed=1" "cfg=2.5 guide=$M/ckpt_0.pt guidenull=1" \
  "cfg=1.75 guide=$M/ckpt_0.pt guidenull=1"
#!/bin/bash
# study 6: DDIM's grid warped toward the data (shift < 1), alone and with the guide told no class
cd /work/runs; source /work/main/.venv/bin/activate
while pgrep -f "study[45].sh" > /dev/null; do sleep 10; done
S=/work/measure/ablation/round2b/sampling.py
M=full/auto_s1337
python $S $M/ckpt.pt 1000 "cfg=2 guide=$M/ckpt_0.pt shift=0.7 seed=1" "cfg=2 guide=$M/ckpt_0.pt shift=0.5" \
  "cfg=2 guide=$M/ckpt_0.pt shift=0.7 guidenull=1" "cfg=2 guide=$M/ckpt_0.pt shift=0.5 guidenull=1"
#!/bin/bash
# study 7: how far to shift the grid (0.35, 0.5 at a second noise seed)
cd /work/runs; source /work/main/.venv/bin/activate
while pgrep -f "study[456].sh" > /dev/null; do sleep 10; done
S=/work/measure/ablation/round2b/sampling.py
M=full/auto_s1337
python $S $M/ckpt.pt 1000 "cfg=2 guide=$M/ckpt_0.pt shift=0.35" "cfg=2 guide=$M/ckpt_0.pt shift=0.5 seed=1"
#!/bin/bash
# FID-2k of both round-2 seeds with main's sampling at this commit (guide told no class) and the time shift 0.5
cd /work/runs; source /work/main/.venv/bin/activate
for s in 1337 1338; do
  t0=$(date +%s)
  python /work/main/fid.py --ckpt=full/auto_s$s/ckpt.pt --num_samples=2000 --ref=cifar10-jpg-test-fid-stats.npz \
    --compile=True --batch_size=100 --mlflow_log=False --shift=0.5 > full/auto_s$s.fid2k_c.log 2>&1
  echo "auto_s$s fid2k guide-null shift 0.5: $(grep -o 'FID [0-9.]*' full/auto_s$s.fid2k_c.log) $(( $(date +%s) - t0 )) s" >> full/runs.log
done
#!/bin/bash
# study 9: FID-2k of the seed-1338 model with each change alone (both: 36.3, neither: 35.1)
cd /work/runs; source /work/main/.venv/bin/activate
S=/work/measure/ablation/round2b/sampling.py
M=full/auto_s1338
python $S $M/ckpt.pt 2000 "cfg=2 guide=$M/ckpt_0.pt guidenull=1" "cfg=2 guide=$M/ckpt_0.pt shift=0.5"
#!/bin/bash
# FID-2k of the seed-1337 model with the guide told no class, no time shift
cd /work/runs; source /work/main/.venv/bin/activate
t0=$(date +%s)
python /work/main/fid.py --ckpt=full/auto_s1337/ckpt.pt --num_samples=2000 --ref=cifar10-jpg-test-fid-stats.npz \
  --compile=True --batch_size=100 --mlflow_log=False --shift=1 > full/auto_s1337.fid2k_d.log 2>&1
echo "auto_s1337 fid2k guide-null: $(grep -o 'FID [0-9.]*' full/auto_s1337.fid2k_d.log) $(( $(date +%s) - t0 )) s" >> full/runs.log
