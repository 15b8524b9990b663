#!/bin/bash
# rows.sh "NAME FLAGS..." ...: N iterations (default 800) of the CPU config with FLAGS, then FID-1k (DDIM 20, cfg 1.5)
cd /work/runs; source /work/main/.venv/bin/activate
code=${CODE:-/work/measure}
mkdir -p round2b
N=${N:-800}
row() {
  name=$1; shift
  t0=$(date +%s)
  python $code/train.py $code/config/train_cifar_cpu.py --data_dir=. --dataset=cifar10-jpg_pixels --max_iters=$N --lr_decay_iters=$N \
      --eval_interval=$N --out_dir=round2b/$name --mlflow_log=False "$@" > round2b/$name.train.log 2>&1
  t1=$(date +%s)
  python $code/fid.py --ckpt=round2b/$name/ckpt.pt --num_samples=1000 --ref=cifar10-jpg-test-fid-stats.npz \
      --compile=True --batch_size=100 --mlflow_log=False > round2b/$name.fid.log 2>&1
  t2=$(date +%s)
  echo "$name | N=$N $* | train $((t1-t0)) s | $(grep 'EMA val' round2b/$name.train.log | tail -1) | $(grep -o 'FID [0-9.]*' round2b/$name.fid.log) | fid $((t2-t1)) s" >> round2b/rows.log
}
for spec in "$@"; do eval row $spec; done
