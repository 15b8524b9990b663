#!/bin/bash
# full_run.sh NAME [flags...]: the full config from /work/runs, copies of ckpt.pt at each evaluation
cd /work/runs
source /work/main/.venv/bin/activate
name=$1; shift
out=full/$name
code=${CODE:-/work/main}
t0=$(date +%s)
python $code/train.py $code/config/train_cifar_cpu.py --data_dir=. --dataset=cifar10-jpg_pixels --out_dir=$out --mlflow_log=False "$@" > full/$name.train.log 2>&1 &
pid=$!
last=""
while kill -0 $pid 2>/dev/null; do
  sleep 5
  if [ -f $out/ckpt.pt ]; then
    m=$(stat -c %Y $out/ckpt.pt)
    if [ "$m" != "$last" ]; then sleep 3; last=$m; n=$(ls $out/ckpt_*.pt 2>/dev/null | wc -l); cp $out/ckpt.pt $out/ckpt_$n.pt; fi
  fi
done
t1=$(date +%s)
echo "$name | $* | train $((t1-t0)) s" >> full/runs.log
