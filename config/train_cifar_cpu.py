# The best class-conditional CIFAR-10 pixel model a 2-core CPU trains in about 30 minutes
# (README, "Results"). Every choice was measured on a 2-core Xeon (Sapphire Rapids), each
# candidate trained for the same 6 minutes of CPU time and scored by FID-1k (dpm++2m,
# 20 steps, cfg 1.5) against the CIFAR-10 test split:
#   size   6 layers x 256 wide (6.1M parameters): 175; 6 x 128 (1.6M, 2.8x the images/s): 188;
#          8 x 192: 224; 4 x 384: 177 (at lr 4e-3, where 6 x 256 gets 151). Wide and shallow
#          wins at this budget: few layers keep it fast, width keeps the matmuls efficient.
#   patch  4 (64 tokens). Patch 2 (256 tokens) costs 2-4x per image: 6 x 128 at patch 2 gets 152,
#          no better, and samples (so FID) 4x slower.
#   lr     4e-3 with gradient clipping at 1: 151; 2e-3: 158; 1e-3: 175; 8e-3: 254 (unstable).
#   batch  64: images/s barely grow with the batch on a CPU (144 at 128 vs 158), so a small batch
#          buys more optimizer steps. (A run at 128 and lr 5.6e-3 was not scored.)
#   t      uniform: 175; logit-normal (SD3) 211, with the cosine schedule and v-prediction (on the flow path it
#          wins: round 1 below).
#   path   the rectified-flow line with the velocity target: after the full 3,300 iterations,
#          FID-2k 63.9 against 71.4 for the cosine schedule with v-prediction (dpm++2m 20 steps;
#          with DDIM 20 steps, 60.4 against 64.8; README, Samplers).
#   round 1 (README, "What each change buys": one change at a time at equal time, FID-1k): logit-normal t on
#          the flow path 105 -> 98; U-ViT long skips 97; SwiGLU 87; 2-D RoPE 84; Muon 75 (model.py builds the
#          skips, SwiGLU and RoPE always). Min-SNR weighting, RMSNorm + QK-norm, other EMA warm-ups and guidance
#          intervals did not help. Muon costs ~20% of the images/s here, so the same time buys 2,400 iterations.
#   round 2 (README, "What each change buys", on a 2-core AMD EPYC, a third of the budget, FID-1k, base 74.1): no
#          training change won. Learning rate 8e-3 74.5, 2e-3 82.6; warm-up 50 73.3 (noise); the dispersive loss 77.3;
#          TREAD (50% of tokens skip blocks 1-4, 1.49x the iterations in the same time) 74.0; batch 32 at equal time
#          (1,250 iterations) 73.7; logit-normal t at (-0.8, 0.8), towards the clean end (JiT's numbers, whose t runs the
#          other way) 73.4; JiT's x-prediction 77.9; contrastive flow matching 74.4; the class in adaLN too 72.7,
#          but at the full budget FID-2k 34.6 and 34.6 against 34.8 and 33.7 (two seeds: no). Sampling the full run's
#          model (FID-1k): classifier-free guidance 1.5 55.5, 2 53.6; autoguidance by the EMA of iteration 800 at 1.5
#          53.1, at 2 51.4 (kept: guide_iter, sample_cfg_scale), at 3 61.6; by the EMA of iteration 1,600 54.5. The
#          full budget, FID-2k: 41.3 with round 1's sampling -> 36.2 and 35.1 (two seeds), the same training. Then the
#          guide told no class (model.guided_prediction): 34.8 and 33.7 (kept). Not kept: the guide of iteration 400 or
#          600; DDIM's times shifted toward the data (FID-2k -1.8 on one seed's model, +2.6 on the other's); guidance
#          only for t in [0.2, 0.8] (-0.5, +1.8); DPM-Solver++ (-0.2, +2.4). At the full budget, seed 1337, FID-2k 34.8:
#          6 x 384 (0.48x the images/s, 1,140 iterations) 50.0: the model is still step-bound, and width costs more
#          steps than it gives; the learning rate decayed linearly to zero 35.1; 6 x 192 (4,080 iterations, ~10% over
#          the budget) 30.4, not yet kept: it needs the exact budget and a second seed.
#   EMA    ema_decay 0.999 has no effect in a run this short: train.py's decay is min(ema_decay,
#          (1+n)/(10+n)), and the warm-up term stays below 0.999 for the first 8,990 iterations. So
#          the average spans the last ~11% of the iterations at every checkpoint (EDM2 finds ~10% good).
#   dtype  train.py's 'auto': bfloat16 autocast where the CPU computes it natively, 1.7x faster than float32
#          on a Xeon with AMX units, 1.3-1.5x on an AMD EPYC with AVX512-BF16; float32 on a CPU with neither.
#   compile: 2.9x faster for small models on a CPU (fewer, fused kernels), 1-1.2x for this one.
#   python prepare_cifar.py --vae=none          (or --source=folder, e.g. the JPEG copy in README)
#   python train.py config/train_cifar_cpu.py
out_dir = "out-cifar-cpu"
dataset = "cifar10_pixels"
compile = True  # the device and dtype are train.py's 'auto': the GPU if there is one, bf16 where it is native
n_layer, n_head, n_embd = 6, 4, 256
patch_size = 4
batch_size = 64
learning_rate = 4e-3
min_lr = 4e-4
warmup_iters = 200
optimizer = "muon"
t_sampling = "logit_normal"
max_iters = 2400  # no longer than the 3,300 AdamW iterations of the old config (README, Results), all included
eval_interval = 800
eval_iters = 40
log_interval = 100
ema_decay = 0.999
noise_schedule = "flow"
prediction = "velocity"
sampler = "ddim"  # the sampler and steps of the best FID-2k on this model (README, Samplers)
sample_steps = 20
sample_cfg_scale = 2.0  # with autoguidance: the best of 1.5, 2 and 3 (README, "What each change buys")
guide_iter = 800  # autoguidance: the EMA of iteration 800 guides the final model (README, "What each change buys")
mlflow_experiment = "cifar10-cpu"
