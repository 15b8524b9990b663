"""
The README's sampler table, first half: how close DDIM and DPM-Solver++(2M) get in n steps
to the converged solution of the same probability-flow ODE, from the same noise. The
distance is the root mean square difference of the images in [-1, 1], averaged over the
samples; the reference is DPM-Solver++(2M) at 250 steps. It also compares time grids for
DPM-Solver++ (uniform in t, or uniform in log-SNR over several ranges): the choice behind
model.logsnr_times.

    python assets/sampler_study.py --ckpt=out-cifar-cpu/ckpt.pt --num=250 --cfg_scale=1.5
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_checkpoint  # noqa: E402
from model import SAMPLERS, draw, logsnr_times, noise_streams, solve, uniform_times  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", required=True)
parser.add_argument("--num", type=int, default=250, help="samples, class-balanced")
parser.add_argument("--cfg_scale", type=float, default=1.5)
parser.add_argument("--steps", default="5,10,20,50")
parser.add_argument("--reference_steps", type=int, default=250)
parser.add_argument("--grids", action=argparse.BooleanOptionalAction, default=True, help="also compare DPM-Solver++ time grids")
args = parser.parse_args()

model, schedule, meta, _ = load_checkpoint(args.ckpt)
labels = torch.arange(args.num) % meta["num_classes"]
x_T = draw(noise_streams(range(args.num), seed=0), meta["shape"])
common = dict(cfg_scale=args.cfg_scale, clip_x0=meta.get("clip_x0"))

def run(sampler, **kwargs):
    t0 = time.time()
    out = torch.cat([sampler(model, schedule, x_T[i : i + 250], labels[i : i + 250], **common, **kwargs) for i in range(0, args.num, 250)])
    return out, time.time() - t0

def distance(a, b):
    return (a - b).square().flatten(1).mean(1).sqrt().mean().item()

def sampler(times, second_order):
    """solve() on the time grid times(schedule, steps), first or second order (model.SAMPLERS holds the named ones)."""
    @torch.no_grad()
    def sample(model, schedule, x_T, y, steps, **kwargs):
        return solve(model, schedule, x_T, y, times(schedule, steps), second_order=second_order, **kwargs)
    return sample

ddim_sample, dpm_solver_sample = sampler(*SAMPLERS["ddim"]), sampler(*SAMPLERS["dpm++2m"])
reference, seconds = run(dpm_solver_sample, steps=args.reference_steps)
print(f"{args.ckpt}: {args.num} samples, cfg_scale {args.cfg_scale}; reference dpm++2m {args.reference_steps} steps ({seconds:.0f} s)")
ddim_ref, _ = run(ddim_sample, steps=args.reference_steps)
print(f"ddim {args.reference_steps} steps to the reference: {distance(ddim_ref, reference):.4f} (how converged both are)")
samplers = {"ddim": ddim_sample, "dpm++2m": dpm_solver_sample}
if args.grids:
    samplers |= {"dpm++2m, t uniform": sampler(uniform_times, True)}
    samplers |= {f"dpm++2m, log-SNR in (-{L}, {L})": sampler(lambda s, n, L=L: logsnr_times(s, n, (-L, L)), True)
                 for L in (3.0, 4.0, 6.0, 8.0)}
print("| sampler | " + " | ".join(f"{n} steps" for n in args.steps.split(",")) + " |")
print("| --- |" + " ---: |" * len(args.steps.split(",")))
for name, sampler in samplers.items():
    cells = [f"{distance(run(sampler, steps=int(n))[0], reference):.4f}" for n in args.steps.split(",")]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
