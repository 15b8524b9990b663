#!/bin/bash
# Round-2 rows at a third of the budget: one change at a time against this session's base row, FID-1k (DDIM 20, cfg 1.5)
# run from a folder with cifar10-jpg_pixels/ (prepare_cifar.py --source=cifar10-jpg --vae=none --data_dir=.) and the
# test split's FID statistics; rows go to ./round2/NAME, their lines to ./round2/rows.log
# e.g.: bash ablation/round2/rows.sh base "wu50 --warmup_iters=50"; N=1190 bash ablation/round2/rows.sh "tread0.5 --tread=0.5"
code=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p round2
N=${N:-800}
row() {  # row NAME FLAGS...
  name=$1; shift
  t0=$(date +%s)
  python $code/train.py $code/config/train_cifar_cpu.py --dataset=cifar10-jpg_pixels --max_iters=$N --lr_decay_iters=$N \
      --eval_interval=$N --out_dir=round2/$name --mlflow_log=False "$@" > round2/$name.train.log 2>&1
  t1=$(date +%s)
  python $code/fid.py --ckpt=round2/$name/ckpt.pt --num_samples=1000 --ref=cifar10-jpg-test-fid-stats.npz \
      --compile=True --batch_size=100 --mlflow_log=False > round2/$name.fid.log 2>&1
  t2=$(date +%s)
  echo "$name | $* | train $((t1-t0)) s | $(grep -o 'FID [0-9.]*' round2/$name.fid.log) | fid $((t2-t1)) s" >> round2/rows.log
}
for spec in "$@"; do eval row $spec; done
