# A B A B speed of training steps of the CPU config and variants, one process, interleaved rounds of 5 steps:
#   python ablation/round2b/ab_speed.py ROUNDS base "sc self_cond=True" "ns3 ns_steps=3" "imm4 immiscible=4"
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch
from model import DiT, DiTConfig, diffusion_loss, get_noise_schedule
from runtime import compile_model

sched = get_noise_schedule("flow")

def make(spec):
    kv = dict(a.split("=") for a in spec.split()[1:])
    cfg = dict(n_layer=6, n_head=4, n_embd=256, self_cond=kv.get("self_cond") == "True",
               class_adaln=kv.get("class_adaln") == "True")
    for k in ("n_layer", "n_head", "n_embd"):
        cfg[k] = int(kv.get(k, cfg[k]))
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=32, in_channels=3, patch_size=4, prediction="velocity", **cfg))
    opts = model.configure_optimizers(0.0, 4e-3, (0.9, 0.999), "cpu", "muon", int(kv.get("ns_steps", 5)))
    net, B = compile_model(model, "cpu"), int(kv.get("batch", 64))
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
    imm = int(kv.get("immiscible", 0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion_loss(net, sched, x, y, "logit_normal", 0.1, None, immiscible=imm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    return step, B

variants = {spec.split()[0]: make(spec) for spec in sys.argv[2:]}
times = {k: [] for k in variants}
for k, (step, B) in variants.items():
    for _ in range(4):
        step()
for rnd in range(int(sys.argv[1])):
    for k, (step, B) in variants.items():
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        times[k].append((time.perf_counter() - t0) / 5 / B)
base = sorted(times[next(iter(times))])[len(times[next(iter(times))]) // 2]
for k, ts in times.items():
    ts = sorted(ts)
    med = ts[len(ts) // 2]
    print(f"{k}: median {med * 1e3 * 64:.0f} ms per 64 images, min {ts[0] * 1e3 * 64:.0f}; images/s ratio to "
          f"{next(iter(times))}: {base / med:.3f}", flush=True)
