"""
Generate images from a checkpoint made by train.py.

    python sample.py --classes=3,5                  # from the newest out*/ckpt.pt in this folder
    python sample.py --ckpt=out/ckpt.pt --classes=cat,dog --num_per_class=16 --sampler=dpm++2m --steps=10 --seed=0
    python sample.py --ckpt=out/ckpt.pt --classes=all --trajectory=True
    python sample.py config/sample_grid.py          # a config file can hold the class list

Writes out_dir/<class>_<index>.png for every image, grid.png (one row per requested
class, its name on the left) and, with --trajectory=True, trajectory.png.
fid.py and train.py take their checkpoints and samples from here: one code path.
"""

import glob
import os
import re
import time
from contextlib import nullcontext

import torch

from data import (DataError, autocast_context, compile_model, fail, load_vae, one_line, pick_device, progress, save_png,
                  to_images, write_atomically)
from model import LAYOUT, SAMPLERS, DiT, DiTConfig, NoiseSchedule, draw, generate, noise_streams

# -----------------------------------------------------------------------------
# default config values
ckpt = ""  # a checkpoint written by train.py (ckpt.pt or best.pt); '' = the newest out*/ckpt.pt in this folder
classes = "all"  # class ids or names, comma-separated ('3,5', 'cat,dog', '3,3,3'), or 'all'
num_per_class = 8  # images per requested class: the columns of grid.png
sampler = "ddim"  # 'ddim', or 'dpm++2m' (DPM-Solver++(2M): nearer the ODE's solution in fewer steps; README, Samplers)
steps = 20  # sampler steps (model evaluations per image); README, Samplers
cfg_scale = 1.5  # classifier-free guidance: 1 = none, larger = more class-typical, less varied
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
dtype = "auto"  # autocast dtype: 'bfloat16' or 'float32' ('auto': bfloat16 on a GPU)
compile = False  # torch.compile the model (pays off for thousands of images)
# -----------------------------------------------------------------------------


def find_checkpoint(path="", quiet=False):
    """path, or if it is '' the newest out*/ckpt.pt in this folder (where train.py's configs put their runs)."""
    if path:
        return path
    found = sorted(glob.glob(os.path.join("out*", "ckpt.pt")), key=os.path.getmtime)
    if not found:
        raise DataError("no --ckpt given and no out*/ckpt.pt in this folder; train one with train.py, or pass "
                        "--ckpt=path/to/ckpt.pt")
    if not quiet:
        print(f"checkpoint: {found[-1]} (the newest out*/ckpt.pt here; --ckpt=... picks another)")
    return found[-1]


def read_checkpoint(path, if_missing="train one with train.py, or pass --ckpt=path/to/ckpt.pt"):
    """The dict in a train.py checkpoint. It holds only tensors, numbers, strings, lists and dicts, so it is read with
    weights_only=True: a file whose pickle would build any other Python object (which is how a booby-trapped checkpoint
    runs code) is refused unread."""
    if not os.path.exists(path):
        raise DataError(f"no checkpoint {path}; {if_missing}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if missing := {"model", "ema", "model_config", "noise_schedule", "meta"} - set(checkpoint):
            raise ValueError(f"it has no {', '.join(sorted(missing))}")
    except Exception as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names what it refused to build
        if unsafe:
            raise DataError(f"{path} would build the Python object {unsafe.group(1)} when loaded, which can run code; "
                            "nano-diffusion checkpoints never do, so it was not loaded") from e
        raise DataError(f"{path} is not a nano-diffusion checkpoint written by train.py ({one_line(e)})") from e
    if checkpoint.get("layout", 1) != LAYOUT:
        raise DataError(f"{path} is from an older model layout (before issue 20's long skips, SwiGLU and RoPE), which "
                        "this code cannot build; train anew, or use the code of that time (git checkout 93c525c)")
    return checkpoint


def load_checkpoint(path, use_ema=True, device="cpu"):
    """(model in eval mode, noise schedule, data meta, checkpoint dict) from a train.py
    checkpoint; DataError with a clear message if it is missing or not one of ours."""
    checkpoint = read_checkpoint(path)
    try:
        model = DiT(DiTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["ema" if use_ema else "model"])
    except Exception as e:
        raise DataError(f"{path} holds a model this code cannot build ({one_line(e)})") from e
    return model.to(device).eval(), NoiseSchedule(**checkpoint["noise_schedule"]), checkpoint["meta"], checkpoint


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


def load_decoder(meta, vae_name, device):
    """The VAE for latent checkpoints (None for pixels)."""
    if meta["kind"] != "latents":
        return None
    try:
        return load_vae(vae_name or meta["vae"], device)
    except DataError as e:
        raise DataError(f"{e}; this checkpoint's latents need their VAE: pass --vae=path/to/vae") from e


def sampler_settings(sampler, steps, cfg_scale, eta=0.0):
    """The keyword arguments of generate() for these settings; ValueError if they do not fit."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's noise and {sampler} is deterministic; use --sampler=ddim or --eta=0")
    return dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, **({"eta": eta} if sampler == "ddim" else {}))


@torch.no_grad()
def sample_images(model, schedule, meta, labels, vae=None, seed=0, batch_size=256, autocast=nullcontext(),
                  first_index=0, **sampling):
    """uint8 images (N, 3, H, W) on the CPU for a tensor of class ids, decoded through the VAE for latent models;
    sampling is sampler_settings(...). Image i (counted from first_index) depends only on seed, i and its label, not on
    batch_size, so a large set can be made in pieces."""
    device, images = next(model.parameters()).device, []
    with progress(len(labels), "sampling") as bar:
        for i in range(0, len(labels), batch_size):
            with autocast:
                samples = generate(model, schedule, labels[i : i + batch_size], meta["shape"], seed, batch_size,
                                   first_index + i, clip_x0=meta.get("clip_x0"), **sampling)
            images.append(to_images(samples.to(device), meta, vae).cpu())
            bar.update(len(samples))
    return torch.cat(images)


def labelled_rows(images, row_names, ncol):
    """uint8 images (N, 3, H, W) -> one HWC uint8 grid, ncol images per row, each row's name on its left."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    (_, _, h, w), rows = images.shape, -(-len(images) // ncol)
    grid = torch.full((rows * (h + 2) + 2, ncol * (w + 2) + 2, 3), 255, dtype=torch.uint8)  # white, 2-pixel gaps
    for i, image in enumerate(images):
        grid[2 + i // ncol * (h + 2) :][:h, 2 + i % ncol * (w + 2) :][:, :w] = image.permute(1, 2, 0)
    grid = grid.numpy()
    font = ImageFont.load_default()
    margin = 6 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in row_names)
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = images.shape[2] + 2  # make_grid's padding is 2
    for row, name in enumerate(row_names):
        draw.text((3, 2 + row * row_height + images.shape[2] // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(canvas)


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    device, dtype = pick_device(device, dtype)
    if num_per_class < 1:
        fail(f"num_per_class must be at least 1, got {num_per_class}")
    if trajectory_show not in ("x_t", "x0"):
        fail(f"trajectory_show must be 'x_t' or 'x0', got {trajectory_show!r}")
    try:
        sampling = sampler_settings(sampler, steps, cfg_scale, eta)
        autocast = autocast_context(device, dtype)
        model, schedule, meta, _ = load_checkpoint(find_checkpoint(ckpt), use_ema, device)
        class_ids = parse_classes(classes, meta["classes"])
        decoder = load_decoder(meta, vae, device)
    except (DataError, ValueError) as e:
        fail(str(e))
    net = compile_model(model, device) if compile else model
    names = [meta["classes"][c] for c in class_ids]

    t0 = time.time()
    labels = torch.tensor(class_ids).repeat_interleave(num_per_class)  # row by row
    images = sample_images(net, schedule, meta, labels, decoder, seed, batch_size, autocast, **sampling)
    seconds = time.time() - t0

    if trajectory:
        # The first image of each row again, keeping every step: the same noise streams, the same final image
        first = torch.arange(len(class_ids)) * num_per_class
        streams, shape = noise_streams(first.tolist(), seed), meta["shape"]
        kwargs = {k: v for k, v in sampling.items() if k != "sampler"}
        kwargs |= {"noise": lambda: draw(streams, shape).to(device)} if eta else {}
        with autocast:
            _, path = SAMPLERS[sampler](net, schedule, draw(streams, shape).to(device), labels[first].to(device),
                                        return_trajectory=True, clip_x0=meta.get("clip_x0"), **kwargs)
        frames = path["x_t"] if trajectory_show == "x_t" else path["x0_pred"]
        picks = torch.linspace(0, len(frames) - 1, min(trajectory_frames, len(frames))).round().long().tolist()
        # (frames, rows, C, H, W) -> (rows, frames, ...) so each row is one class's path
        chosen = torch.stack([to_images(frames[k], meta, decoder).cpu() for k in picks]).transpose(0, 1)
        trajectory_grid = labelled_rows(chosen.flatten(0, 1), names, len(picks))

    def write(folder):
        counts = {}
        for image, name in zip(images, [n for n in names for _ in range(num_per_class)]):
            index = counts[name] = counts.get(name, -1) + 1
            save_png(image.permute(1, 2, 0).numpy(), os.path.join(folder, f"{name}_{index:04d}.png"))
        save_png(labelled_rows(images, names, num_per_class), os.path.join(folder, "grid.png"))
        if trajectory:
            save_png(trajectory_grid, os.path.join(folder, "trajectory.png"))

    write_atomically(out_dir, write)
    print(f"{len(images)} images of {', '.join(dict.fromkeys(names))} in {seconds:.1f} s ({len(images) / seconds:.1f} "
          f"images/s, {sampler} {steps} steps, cfg_scale {cfg_scale}, {'EMA' if use_ema else 'raw'} weights) -> "
          f"{out_dir}/grid.png"
          + (f", {out_dir}/trajectory.png ({trajectory_show})" if trajectory else ""))
