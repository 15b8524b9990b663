# CIFAR-10 in pixel space: DiT-B size, patch 2 -> 256 tokens of 32x32x3 pixels.
#   python prepare_cifar.py --vae=none
#   python train.py config/train_cifar_pixels.py            (or: torchrun --standalone --nproc_per_node=8 train.py ...)
out_dir = "out-cifar-pixels"
dataset = "cifar10_pixels"
n_layer, n_head, n_embd = 12, 12, 768  # DiT-B (Peebles & Xie 2022, Table 1)
patch_size = 2
batch_size = 256
optimizer = "muon"  # measured on the CPU model (config/train_cifar_cpu.py, README "What each change buys"), untried here
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 1000
max_iters = 100000
eval_interval = 2000
ema_decay = 0.9999  # takes over after 89,990 iterations; before, the average spans ~11% of the run
# guide_iter (autoguidance by the run's own earlier EMA) won on the CPU model alone (README, "What each change buys");
# untried here: the guide's iteration and the scale depend on how far the run goes, so they need measuring at this scale
noise_schedule = "cosine"
prediction = "v"
compile = True
mlflow_experiment = "cifar10-pixels"
