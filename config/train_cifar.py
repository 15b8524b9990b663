# The original project's default: CIFAR-10 as latents of the 16-channel VAE
# ostris/vae-kl-f8-d16 (32x32 images -> 16x4x4 latents, 16 tokens with patch 1),
# a DiT-B-like model, EMA 0.9999, cosine noise schedule.
#   python prepare_cifar.py
#   python train.py config/train_cifar.py
out_dir = "out-cifar"
dataset = "cifar10_vae-kl-f8-d16_32"
n_layer, n_head, n_embd = 12, 12, 768  # DiT-B (Peebles & Xie 2022, Table 1)
patch_size = 1
batch_size = 256
optimizer = "muon"  # measured on the CPU model (config/train_cifar_cpu.py, README "What each change buys"), untried here
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 1000
max_iters = 100000
eval_interval = 2000
ema_decay = 0.9999  # takes over after 89,990 iterations; before, the average spans ~11% of the run
# guide_iter (autoguidance by the run's own earlier EMA) won on the CPU model alone (README, "What each change buys");
# untried here: the guide's iteration and the scale depend on how far the run goes, so they need measuring at this scale
noise_schedule = "cosine"
prediction = "v"
compile = True
mlflow_experiment = "cifar10-latents"
