"""
The README's plot of the noise schedules: how much signal each one leaves at time t,
and its log signal-to-noise ratio, for model.py's four paths at their default settings.

    python assets/plot_schedules.py            # -> assets/schedules.png (needs matplotlib)
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import get_noise_schedule  # noqa: E402

t = torch.linspace(0, 1, 501, dtype=torch.float64)
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
for name in ["linear", "cosine", "sigmoid", "flow"]:
    alpha, sigma = get_noise_schedule(name).alpha_sigma(t)
    signal = alpha**2 / (alpha**2 + sigma**2)  # gamma(t) for the VP schedules
    left.plot(t, signal, label=name)
    right.plot(t, 2 * (alpha.log() - sigma.log()), label=name)
left.set(xlabel="t", ylabel="signal fraction  alpha² / (alpha² + sigma²)", title="gamma(t): 1 = clean, 0 = noise")
right.set(xlabel="t", ylabel="log-SNR  log(alpha² / sigma²)", title="log signal-to-noise ratio", ylim=(-22, 12))
for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedules.png")
fig.savefig(out, dpi=110)
print(f"wrote {out}")
