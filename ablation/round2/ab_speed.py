# A B A B speed of training steps of the CPU config: base, TREAD 0.5, dispersive 0.5 (one process, interleaved)
# python ablation/round2/ab_speed.py 12   (rounds of 5 steps each)
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo
import torch
from model import DiT, DiTConfig, diffusion_loss, get_noise_schedule
from runtime import compile_model
torch.manual_seed(0)
cfg = DiTConfig(input_size=32, in_channels=3, patch_size=4, n_layer=6, n_head=4, n_embd=256, prediction="velocity")
model = DiT(cfg)
opts = model.configure_optimizers(0.0, 4e-3, (0.9, 0.999), "cpu", "muon")
net = compile_model(model, "cpu")
sched = get_noise_schedule("flow")
x = torch.randn(64, 3, 32, 32); y = torch.randint(0, 10, (64,))
variants = {"base": (0.0, 0.0), "tread0.5": (0.5, 0.0), "disp0.5": (0.0, 0.5)}
def step(route, disp):
    model.route = route
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion_loss(net, sched, x, y, "logit_normal", 0.1, None, disp, 0.5)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for o in opts:
        o.step(); o.zero_grad(set_to_none=True)
times = {k: [] for k in variants}
for k, v in variants.items():
    for _ in range(3): step(*v)
for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    for k, v in variants.items():
        t0 = time.perf_counter()
        for _ in range(5): step(*v)
        times[k].append((time.perf_counter() - t0) / 5)
for k, ts in times.items():
    ts = sorted(ts)
    print(f"{k}: median {ts[len(ts)//2]*1000:.0f} ms/step, min {ts[0]*1000:.0f}; ratio to base (images/s) {sorted(times['base'])[len(ts)//2] / ts[len(ts)//2]:.3f}")
