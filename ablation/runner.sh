#!/bin/bash
# Runs the jobs in /work/runs/queue/*.job one at a time, in name order; each job is a bash script.
# A finished job is renamed .done (its output in .out); touch /work/runs/queue/STOP to stop after the current one.
cd /work/runs
while [ ! -f queue/STOP ]; do
  job=$(ls queue/*.job 2>/dev/null | head -1)
  if [ -z "$job" ]; then sleep 10; continue; fi
  echo "$(date +%T) start $job" >> queue/runner.log
  bash $job > ${job%.job}.out 2>&1
  echo "$(date +%T) end $job rc $?" >> queue/runner.log
  mv $job ${job%.job}.done
done
