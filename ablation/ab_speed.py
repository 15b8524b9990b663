"""Paired training-step speed of two candidate configs (A B A B ... in one process, so drift cancels):
python ab_speed.py '{"skip": true}' '{}'   -- JSON overrides of the CPU config's model/loss/optimizer."""
import json, os, sys, time, statistics, copy
import torch
sys.path.insert(0, "/work/exp")
from model import DiT, DiTConfig, diffusion_loss, get_noise_schedule
import torch._inductor.config
torch._inductor.config.cpp.max_horizontal_fusion_size = 0
BASE = dict(n_layer=6, n_head=4, n_embd=256, patch_size=4, mlp_ratio=4.0)
def build(over):
    over = dict(over); batch = over.pop("batch_size", 64)
    loss_kw = dict(weighting=over.pop("loss_weighting", "none"), t_sampling=over.pop("t_sampling", "uniform"))
    opt_name = over.pop("optimizer_name", "adamw")
    cfg = DiTConfig(input_size=32, in_channels=3, num_classes=10, prediction="velocity", **{**BASE, **over})
    model = DiT(cfg); ema = copy.deepcopy(model).requires_grad_(False)
    opts = model.configure_optimizers(0.0, 1e-3, (0.9, 0.999), "cpu", opt_name)
    opts = opts if isinstance(opts, list) else [opts]
    net, sched = torch.compile(model), get_noise_schedule("flow")
    x, y = torch.rand(4096, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (4096,))
    ep, mp = list(ema.parameters()), list(model.parameters())
    def step():
        idx = torch.randint(4096, (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion_loss(net, sched, x[idx], y[idx], **loss_kw)
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts: o.step(); o.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ep, mp, 0.001)
    for _ in range(4): step()
    return step, batch, model.num_params()
configs = [json.loads(a) for a in sys.argv[1:]]  # the first is the baseline B; the others are each compared with it
rounds = int(os.environ.get("ROUNDS", 8))
steps = [build(c) for c in configs]
times = [[] for _ in configs]
for rep in range(rounds):
    for i, (step, batch, _) in enumerate(steps):
        t = time.perf_counter(); [step() for _ in range(4)]; times[i].append((time.perf_counter() - t) / 4)
for c, (step, batch, n), ts in zip(configs, steps, times):
    ratio = statistics.median([b / a for a, b in zip(ts, times[0])]) * batch / steps[0][1]  # images/s vs the first, per round
    print(f"{json.dumps(c)}: {n/1e6:.2f}M params, median {statistics.median(ts)*1000:.0f} ms/step, "
          f"{batch/statistics.median(ts):.1f} img/s, images/s ratio to the first {ratio:.3f}", flush=True)
