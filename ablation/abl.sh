#!/bin/bash
# abl.sh NAME ITERS [train.py args...]: one ablation row: train ITERS iterations (cosine decay to ITERS), then FID-1k
# (DDIM 20 steps, cfg 1.5: the config's defaults, unless FID_ARGS says otherwise) against the JPEG test split
name=$1; iters=$2; shift 2
cd /work/runs
rm -rf abl_$name
./full.sh /work/exp abl_$name /work/exp/config/train_cifar_cpu.py --dataset=cifar10-jpg_pixels --max_iters=$iters \
    --lr_decay_iters=$iters --eval_interval=$iters --mlflow_experiment=ablation --mlflow_run_name=$name "$@"
cat abl_$name.time
/work/main/.venv/bin/python /work/exp/fid.py --ckpt=abl_$name/ckpt.pt --num_samples=1000 --ref=cifar10-jpg-test-fid-stats.npz \
    --dtype=bfloat16 --compile=True --batch_size=100 --mlflow_log=False $FID_ARGS 2>&1 | grep -E "^FID|error" | tee abl_$name.fid
