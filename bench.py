"""
Speed on synthetic data, as nanoGPT's bench.py: a training step (loss, backward, clipping, the optimizer, EMA) and
guided sampling, without data files, evaluation or logging: ms per step, images/s, TFLOP/s, MFU and peak memory.

    python bench.py                                            # the pixel CIFAR config
    python bench.py config/train_cifar.py --batch_size=256 --compile=True
    python bench.py --compile=False --bench_sampling=False     # keys only train.py uses are ignored
"""

import os
import sys
import time

import torch

from data import load_meta
from model import SAMPLERS, DiT, DiTConfig, diffusion_loss, get_noise_schedule, solve
from runtime import autocast_context, compile_model, fail, gpu_peak_flops, pick_device
from sample import sampler_settings

# --- default config values (without a config file on the command line, config/train_cifar_pixels.py's) ----------------
batch_size = 256  # training images per step
n_layer = 12
n_head = 12
n_embd = 768
patch_size = 2
mlp_ratio = 4.0
dropout = 0.0
prediction = "v"
noise_schedule = "cosine"
learning_rate = 1e-4
optimizer = "adamw"  # 'adamw' or 'muon' (model.configure_optimizers)
dataset = "cifar10_pixels"  # only its shape and class count: from data_dir/<dataset>/meta.json, else KNOWN_SHAPES
data_dir = "data"
input_shape = ()  # (C, H, W): overrides the dataset's shape, e.g. --input_shape=3,64,64
num_classes = 10
warmup_steps = 10  # untimed steps first (torch.compile compiles here)
bench_steps = 30  # timed training steps
bench_sampling = True  # also time sampling
sample_batch_size = 256  # images per sampling batch (x2 inside the model with guidance)
sampler = "ddim"  # 'ddim' or 'dpm++2m'
sample_steps = 20
sample_cfg_scale = 1.5
device = "auto"  # 'auto' (a GPU if there is one, else the CPU), or e.g. 'cuda:1', 'cpu'
dtype = "auto"  # autocast dtype: 'bfloat16' or 'float32' ('auto': bfloat16 where the hardware computes it natively)
compile = True
peak_flops = 0.0  # the device's peak FLOP/s for MFU (0: look the GPU up in runtime.GPU_PEAK_FLOPS)
seed = 1337
# -----------------------------------------------------------------------------
_config_files_may_set_other_keys = True  # train configs carry keys that only train.py uses
if not any(arg.endswith(".py") for arg in sys.argv[1:]):
    sys.argv.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "train_cifar_pixels.py"))
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------
KNOWN_SHAPES = {"cifar10_pixels": (3, 32, 32), "cifar10_vae-kl-f8-d16_32": (16, 4, 4)}

data_path = os.path.join(data_dir, dataset)
if not input_shape and os.path.exists(os.path.join(data_path, "meta.json")):
    meta = load_meta(data_path)
    input_shape, num_classes = meta["shape"], meta["num_classes"]
shape = tuple(input_shape) or KNOWN_SHAPES.get(dataset)
if not shape:
    fail(f"no {data_path}/meta.json to read the input shape from; pass --input_shape=C,H,W")
if len(shape) != 3 or shape[1] != shape[2]:
    fail(f"input_shape must be C,H,W with H == W, got {shape}")
device, dtype, _ = pick_device(device, dtype)
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
torch.manual_seed(seed)
try:  # the settings, and Muon on a torch without it
    sampler_settings(sampler, sample_steps, sample_cfg_scale)
    autocast = autocast_context(device, dtype)
    config = DiTConfig(input_size=shape[1], in_channels=shape[0], patch_size=patch_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd, mlp_ratio=mlp_ratio, num_classes=num_classes, dropout=dropout,
                       prediction=prediction)
    model = DiT(config).to(device)
    optimizers = model.configure_optimizers(0.0, learning_rate, (0.9, 0.999), device_type, optimizer)
except ValueError as e:
    fail(str(e))
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
ema_model = DiT(config).to(device).requires_grad_(False).eval()
net = compile_model(model, device) if compile else model
schedule = get_noise_schedule(noise_schedule)
peak = peak_flops or gpu_peak_flops(device)

# synthetic data of the right shape, on the device, drawn by random indices as train.py does
x_all = torch.randn(4096, *shape, device=device)
y_all = torch.randint(0, num_classes, (4096,), device=device)

def train_step():
    idx = torch.randint(len(x_all), (batch_size,), device=device)
    with autocast:
        loss = diffusion_loss(net, schedule, x_all[idx], y_all[idx])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for o in optimizers:
        o.step()
        o.zero_grad(set_to_none=True)
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1e-4)

def timed(fn, repeats):
    """(seconds per call of fn, peak GPU memory of these calls in GiB or None)"""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None
    return (time.perf_counter() - t0) / max(1, repeats), memory

print(f"warming up {warmup_steps} training steps{' (compiling)' if compile else ''}...", flush=True)
timed(train_step, warmup_steps)
rows = [("train step", batch_size, batch_size * model.flops_per_image(training=True), *timed(train_step, bench_steps))]

if bench_sampling:
    net.eval()
    x_T = torch.randn(sample_batch_size, *shape, device=device)
    y = torch.randint(0, num_classes, (sample_batch_size,), device=device)
    times, second_order = SAMPLERS[sampler]
    ts = times(schedule, sample_steps)

    def sample():
        with autocast, torch.no_grad():
            solve(net, schedule, x_T, y, ts, sample_cfg_scale, second_order=second_order)

    timed(sample, 1)  # warm-up (and compilation of the eval graph)
    passes = 2 if sample_cfg_scale != 1.0 else 1  # cond + uncond in one batch
    flops = sample_batch_size * sample_steps * passes * model.flops_per_image(training=False)
    repeats = 3 if device_type == "cuda" else 1  # a CPU is slow enough that one run is steady
    what = f"{sampler} {sample_steps} steps, cfg {sample_cfg_scale}"
    rows.append((what, sample_batch_size, flops, *timed(sample, repeats)))

device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else device
print(f"\n{device_name}, {model.num_params() / 1e6:.1f}M parameters, {model.grid_size**2} tokens per image "
      f"({'x'.join(map(str, shape))}, patch {patch_size}), {dtype}, compile {'on' if compile else 'off'}"
      + (f", peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
print("| what | batch | ms | images/s | TFLOP/s | MFU | peak memory |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for what, batch, flops, seconds, memory in rows:
    mfu = f"{flops / seconds / peak * 100:.1f}%" if peak else "-"
    mem = f"{memory:.1f} GiB" if memory is not None else "-"
    tflops = flops / seconds / 1e12
    print(f"| {what} | {batch} | {seconds * 1000:.1f} | {batch / seconds:.1f} | {tflops:.3g} | {mfu} | {mem} |")
