"""
The data: CIFAR-10 and folders of images, the prepared dataset (data/<name>/{train,test}.pt and meta.json) and its
batches, model space <-> uint8 images, and the VAE (a diffusers AutoencoderKL) between images and latents. Model space
is what the diffusion model sees: pixels in [-1, 1], or the VAE's latents normalised per channel to mean 0 and std 1.
"""

import json
import os
import warnings

import numpy as np
import torch

from runtime import DataError, one_line, progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")

# --- images -----------------------------------------------------------------------------------------------------------

def load_cifar10(download_dir, split):
    """(uint8 images (N, 3, 32, 32), int64 labels, class names) of CIFAR-10's split, downloaded once by torchvision."""
    import torchvision
    try:
        dataset = torchvision.datasets.CIFAR10(download_dir, train=split == "train", download=True)
    except Exception as e:
        raise DataError(f"could not download CIFAR-10 to {download_dir} ({one_line(e)}); "
                        "without network, give a folder of images instead") from e
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    return images, torch.tensor(dataset.targets), dataset.classes

def image_files(folder):
    """Every image file below folder, at any depth, sorted."""
    files = (os.path.join(root, f) for root, _, names in os.walk(folder) for f in names)
    return sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))

def resize_crop(image, size):
    """PIL image -> RGB, its central square resized to size x size (bicubic); as it is if it has that size."""
    from PIL import Image, ImageOps
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.BICUBIC)

def read_images(paths, size=None, what=""):
    """uint8 (N, 3, H, W) from image files, resized and cropped to size x size, or as they are (then of one size)."""
    from PIL import Image
    images = []
    with progress(len(paths), f"reading {what or 'images'}") as bar:
        for path in paths:
            try:
                with Image.open(path) as image:
                    array = np.asarray(resize_crop(image, size) if size else image.convert("RGB"))
            except Exception as e:
                raise DataError(f"cannot read image {path} ({one_line(e)}); remove or replace it") from e
            if images and array.shape != images[0].shape:
                raise DataError(f"images differ in size: {paths[0]} is {images[0].shape[1]}x{images[0].shape[0]}, "
                                f"{path} is {array.shape[1]}x{array.shape[0]}; give images of one size")
            images.append(array)
            bar.update()
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)

# --- the prepared dataset ---------------------------------------------------------------------------------------------

def load_split(data_dir, split):
    """data_dir/<split>.pt -> (x, labels): x uint8 (N, 3, H, W) pixels or float16 latents."""
    path = os.path.join(data_dir, f"{split}.pt")
    if not os.path.exists(path):
        raise DataError(f"no {path}; make it with: python prepare_cifar.py (see README, 'Preparing data')")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["x"], blob["labels"]
    except Exception as e:
        raise DataError(f"{path} is not a dataset written by prepare_cifar.py ({one_line(e)})") from e

def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise DataError(f"no {path}; make it with: python prepare_cifar.py (see README, 'Preparing data')")
    with open(path) as f:
        return json.load(f)

def latent_stats(meta, device):
    """The per-channel mean and std of the train latents, shaped (1, C, 1, 1)."""
    return (torch.tensor(meta[key], device=device).view(1, -1, 1, 1) for key in ("latent_mean", "latent_std"))

def to_model_space(x, meta):
    """A batch as stored (uint8 pixels or raw latents) -> float32 model input."""
    if meta["kind"] == "pixels":
        return from_uint8(x)
    mean, std = latent_stats(meta, x.device)
    return (x.float() - mean) / std

def get_batch(x_all, y_all, n, meta, flip=False, generator=None):
    """n random images and labels of a dataset on the device, in model space, all drawn from generator. flip mirrors
    half of the pixel images, the one augmentation CIFAR models use (latents come flipped from prepare_cifar.py)."""
    idx = torch.randint(len(x_all), (n,), device=x_all.device, generator=generator)
    x, y = x_all[idx], y_all[idx]
    if meta["kind"] == "pixels":
        x = to_model_space(x, meta)  # uint8 -> [-1, 1]
        if flip:
            flipped = torch.rand(n, device=x.device, generator=generator) < 0.5
            x = torch.where(flipped.view(n, 1, 1, 1), x.flip(3), x)
    return x, y

def from_uint8(x):
    """uint8 images -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0

def to_uint8(x):
    """[-1, 1] float images -> uint8 (B, 3, H, W)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

# --- the VAE ----------------------------------------------------------------------------------------------------------

def load_vae(name_or_path, device="cpu"):
    """A diffusers AutoencoderKL from the Hugging Face hub or a local folder, frozen, in eval mode."""
    try:
        from diffusers import AutoencoderKL  # imported here: 1-3 s, and only latent data needs it
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import logging as hub_logging
    except ImportError as e:
        raise DataError("latent data needs diffusers: pip install diffusers") from e
    diffusers_logging.set_verbosity_error()  # our own message says what went wrong
    hub_logging.set_verbosity_error()  # (including the hub's retry lines when offline)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    except Exception as e:
        raise DataError(f"could not load the VAE '{name_or_path}' ({one_line(e)}); without network, download it "
                        "elsewhere and pass its local folder with --vae=path/to/vae") from e
    return vae.to(device).eval().requires_grad_(False)

def vae_scaling(vae):
    """(scale, shift) of the VAE's convention z = (latent - shift) * scale (SD 1.x: 0.18215 and 0; SD3, Flux: both)."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)

@torch.no_grad()
def encode(vae, images):
    """uint8 (B, 3, H, W) images -> float32 latents: the encoder's mean, not a sample, so the data is deterministic."""
    scale, shift = vae_scaling(vae)
    latent = vae.encode(from_uint8(images.to(vae.device))).latent_dist.mean
    return ((latent - shift) * scale).float()

@torch.no_grad()
def to_images(x, meta, vae=None, batch_size=256):
    """Model-space samples -> uint8 images on the CPU; latents are un-normalised and decoded, batch_size at a time."""
    if meta["kind"] == "pixels":
        return to_uint8(x).cpu()
    if vae is None:
        raise DataError("latent samples need the VAE to become images")
    mean, std = latent_stats(meta, vae.device)
    latent = (x.to(vae.device).float() * std + mean) / meta["scaling_factor"] + meta["shift_factor"]
    return torch.cat([to_uint8(vae.decode(z).sample).cpu() for z in latent.split(batch_size)])
