"""
Generate images from a checkpoint made by train.py.

    python sample.py --classes=3,5                  # from the newest out*/ckpt.pt in this folder
    python sample.py --ckpt=out/ckpt.pt --classes=cat,dog --num_per_class=16 --sampler=dpm++2m --steps=10 --seed=0
    python sample.py --ckpt=out/ckpt.pt --classes=all --trajectory=True
    python sample.py config/sample_grid.py          # a config file can hold the class list

Writes out_dir/<class>_<index>.png for every image, grid.png (a row per class) and, with --trajectory=True,
trajectory.png. train.py's sample grids and fid.py's samples are made here too: one code path.
"""

import os
import time
from contextlib import nullcontext

import numpy as np
import torch

from checkpoint import find_checkpoint, load_checkpoint, load_guide
from data import load_vae, to_images
from model import SAMPLERS, generate
from runtime import DataError, autocast_context, compile_model, fail, pick_device, progress, write_folder

# --- default config values --------------------------------------------------------------------------------------------
ckpt = ""  # a checkpoint written by train.py (ckpt.pt or best.pt); '' = the newest out*/ckpt.pt in this folder
classes = "all"  # class ids or names, comma-separated ('3,5', 'cat,dog', '3,3,3'), or 'all'
num_per_class = 8  # images per requested class: the columns of grid.png
sampler = "ddim"  # 'ddim', or 'dpm++2m' (DPM-Solver++(2M): nearer the ODE's solution in fewer steps; README, Samplers)
steps = 20  # sampler steps (model evaluations per image); README, Samplers
cfg_scale = 0.0  # guidance: 1 = none, larger = sharper and more class-typical; 0 = the checkpoint's (its sample_cfg_scale)
autoguidance = True  # guide with the checkpoint's earlier weights where it holds them (train.py's guide_iter), else CFG
eta = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like (DDIM only)
seed = 0  # the same seed gives the same images
batch_size = 256 if torch.cuda.is_available() else 64  # images per batch (2x inside with guidance); 64 is best on a CPU
use_ema = True  # sample with the EMA weights (False: the raw weights)
out_dir = "samples"  # replaced as a whole when the new images are ready
trajectory = False  # also write trajectory.png: each class's image along the denoising path
trajectory_frames = 10  # columns of trajectory.png, evenly spaced from noise to the sample
trajectory_show = "x_t"  # 'x_t' (the noisy image at each step) or 'x0' (the model's guess of the final image)
vae = ""  # latent checkpoints: the VAE to decode with ('' = the one named in the checkpoint)
device = "auto"  # 'auto' (a GPU if there is one, else the CPU), or e.g. 'cuda:1', 'cpu'
dtype = "auto"  # autocast dtype: 'bfloat16' or 'float32' ('auto': bfloat16 where the hardware computes it natively)
compile = False  # torch.compile the model (pays off for thousands of images)
# -----------------------------------------------------------------------------

def parse_classes(text, names):
    """'3,5' / 'cat,dog' / 'all' -> list of class ids (repeats kept)."""
    if text.strip() == "all":
        return list(range(len(names)))
    ids = []
    for token in (t.strip() for t in text.split(",")):
        if token.isdigit() and int(token) < len(names):
            ids.append(int(token))
        elif token in names:
            ids.append(names.index(token))
        else:
            valid = ", ".join(f"{i}={name}" for i, name in enumerate(names))
            raise DataError(f"unknown class '{token}'; valid classes: {valid}, or 'all'")
    return ids

def sampler_settings(sampler, steps, cfg_scale, eta=0.0):
    """The keyword arguments of generate() for these settings; ValueError if they do not fit."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's noise and {sampler} is deterministic; use --sampler=ddim or --eta=0")
    return dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, eta=eta)

@torch.no_grad()
def sample_images(model, schedule, meta, labels, vae=None, seed=0, batch_size=256, autocast=nullcontext(), indices=None,
                  trajectory=False, **sampling):
    """uint8 images on the CPU (model.generate, decoded); sampling: sampler_settings(...); trajectory adds the path."""
    with autocast, progress(len(labels), "sampling") as bar:
        out = generate(model, schedule, labels, meta["shape"], seed, batch_size, indices, clip_x0=meta.get("clip_x0"),
                       trajectory=trajectory, bar=bar, **sampling)
    if not trajectory:
        return to_images(out, meta, vae, batch_size)
    samples, path = out
    return to_images(samples, meta, vae, batch_size), {k: [to_images(x, meta, vae) for x in v] for k, v in path.items()}

def labelled_rows(images, row_names, ncol):
    """uint8 images (N, 3, H, W) -> an HWC uint8 grid of ncol columns, each row's name in a margin on its left."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    grid = Image.fromarray(make_grid(images, nrow=ncol, padding=2, pad_value=255).permute(1, 2, 0).numpy())
    font = ImageFont.load_default()
    margin = 6 + max(int(ImageDraw.Draw(grid).textlength(name, font=font)) for name in row_names)
    canvas = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(row_names):  # each name centred on its row of images
        middle = 2 + row * (images.shape[2] + 2) + images.shape[2] // 2
        draw.text((3, middle), name, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(canvas)

def save_png(image_hwc, path):
    from PIL import Image
    Image.fromarray(image_hwc).save(path, format="PNG")

if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    device, dtype, why = pick_device(device, dtype)
    try:
        if num_per_class < 1:
            raise ValueError(f"num_per_class must be at least 1, got {num_per_class}")
        if trajectory_show not in ("x_t", "x0"):
            raise ValueError(f"trajectory_show must be 'x_t' or 'x0', got {trajectory_show!r}")
        autocast = autocast_context(device, dtype)
        model, schedule, meta, checkpoint = load_checkpoint(path := find_checkpoint(ckpt), use_ema, device)
        cfg_scale = cfg_scale or checkpoint["config"]["sample_cfg_scale"]  # the best scale depends on the guide it has
        sampling = sampler_settings(sampler, steps, cfg_scale, eta)
        guide = load_guide(checkpoint, device, path) if autoguidance else None
        class_ids = parse_classes(classes, meta["classes"])
        decoder = load_vae(vae or meta["vae"], device) if meta["kind"] == "latents" else None
    except (DataError, ValueError) as e:
        fail(str(e))
    print(f"sampling on {device} in {why}")
    net, guide = (compile_model(m, device) if compile and m is not None else m for m in (model, guide))
    sampling["guide"] = guide
    names = [meta["classes"][c] for c in class_ids]
    t0 = time.time()
    labels = torch.tensor(class_ids).repeat_interleave(num_per_class)  # row by row
    images = sample_images(net, schedule, meta, labels, decoder, seed, batch_size, autocast, **sampling)
    seconds = time.time() - t0
    if trajectory:  # the first image of each row again, its path kept: the same image numbers, the same final images
        first = torch.arange(len(class_ids)) * num_per_class
        _, path = sample_images(net, schedule, meta, labels[first], decoder, seed, batch_size, autocast,
                                first.tolist(), trajectory=True, **sampling)
        frames = path["x_t" if trajectory_show == "x_t" else "x0_pred"]
        picks = torch.linspace(0, len(frames) - 1, min(trajectory_frames, len(frames))).round().long().tolist()
        chosen = torch.stack([frames[k] for k in picks], dim=1)  # (rows, frames, 3, H, W): a row is one image's path

    def write(folder):
        counts = {}
        for image, name in zip(images, [n for n in names for _ in range(num_per_class)]):
            index = counts[name] = counts.get(name, -1) + 1
            save_png(image.permute(1, 2, 0).numpy(), os.path.join(folder, f"{name}_{index:04d}.png"))
        save_png(labelled_rows(images, names, num_per_class), os.path.join(folder, "grid.png"))
        if trajectory:
            save_png(labelled_rows(chosen.flatten(0, 1), names, len(picks)), os.path.join(folder, "trajectory.png"))

    try:
        write_folder(out_dir, write)
    except DataError as e:
        fail(str(e))
    guidance = "autoguidance" if guide is not None else "cfg_scale"
    print(f"{len(images)} images of {', '.join(dict.fromkeys(names))} in {seconds:.1f} s ({len(images) / seconds:.1f} "
          f"images/s, {sampler} {steps} steps, {guidance} {cfg_scale}, {'EMA' if use_ema else 'raw'} weights) -> "
          f"{out_dir}/grid.png" + (f", {out_dir}/trajectory.png ({trajectory_show})" if trajectory else ""))
