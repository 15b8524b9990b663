#!/bin/bash
# full.sh CODE_DIR OUT_DIR [train.py args...]: one timed training run from /work/runs; keeps a copy of
# ckpt.pt at every eval (ckpt_<iter>.pt) and writes the wall time of the whole process to OUT_DIR.time
code=$1; out=$2; shift 2
cd /work/runs
py=/work/main/.venv/bin/python
start=$(date +%s.%N)
$py $code/train.py "$@" --out_dir=$out --mlflow_tracking_uri=sqlite:////work/runs/mlflow.db > $out.log 2>&1 &
pid=$!
last=""
copy() {
  if [ -f $out/ckpt.pt ]; then
    m=$(stat -c %Y.%s $out/ckpt.pt)
    if [ "$m" != "$last" ]; then
      it=$(grep -oP '^iter \K\d+(?=: val loss)' $out.log | tail -1)
      cp $out/ckpt.pt $out/ckpt_$it.pt; last=$m
    fi
  fi
}
while kill -0 $pid 2>/dev/null; do copy; sleep 2; done
wait $pid; rc=$?
end=$(date +%s.%N)
copy
echo "rc $rc wall $(echo "$end - $start" | bc) s" > $out.time
