#!/bin/bash
cd /work/runs
while pgrep -f "sampling.py" > /dev/null; do sleep 10; done
./rows.sh "tshift --t_mean=-0.8 --t_std=0.8" "cadaln --class_adaln=True" "contrastive --contrastive=0.05" "xpred --prediction=x"
#!/bin/bash
cd /work/runs; source /work/main/.venv/bin/activate
while pgrep -f "queue1.sh" > /dev/null; do sleep 10; done
python /work/measure/ablation/round2b/ab_speed.py 8 base "sc self_cond=True" "ns3 ns_steps=3" "imm4 immiscible=4" "b128 batch=128" "ca class_adaln=True" > round2b/ab_speed1.log 2>&1
./rows.sh "base"
#!/bin/bash
cd /work/runs
while pgrep -f "queue2.sh" > /dev/null; do sleep 10; done
N=700 ./rows.sh "selfcond --self_cond=True"
N=430 ./rows.sh "b128 --batch_size=128 --warmup_iters=100"
./rows.sh "linear0 --lr_decay=linear --min_lr=0.0"
