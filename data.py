"""
What the scripts (prepare_cifar.py, train.py, sample.py, fid.py, bench.py) share:
- user errors as one clear line, progress bars, MLflow's set-up,
- the device: its choice, bf16 autocast, torch.compile, peak FLOP/s, and the processes under torchrun,
- real images: CIFAR-10 through torchvision, image files, FID's references named by one string,
- the prepared dataset on disk (data/<name>/{train,test}.pt and meta.json),
- the pretrained VAE (a diffusers AutoencoderKL) that turns images into latents and back,
- model space <-> uint8 images, PNGs and atomic writes.

Model space is what the diffusion model sees: pixels scaled to [-1, 1], or VAE latents
in the VAE's scaling convention, normalised per channel to zero mean and unit std.
"""

import json
import os
import shutil
import sys
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


class DataError(RuntimeError):
    """A problem with the user's data or VAE; its message says what to do."""


def one_line(error, limit=200):
    """An exception as one short line, for messages that must fit on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}" if text else type(error).__name__


def fail(message):
    """End the program on a user error: one line on stderr, exit status 1."""
    sys.exit(f"error: {message}")


def warn(message):
    """One line on stderr about something the program goes on without."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def progress(total, what):
    """A progress bar on stderr with the rate and time left, in a terminal only (none in logs) and on rank 0 only."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="img", disable=None if rank_and_world()[0] == 0 else True, leave=False)


def mlflow_tracking(uri=""):
    """(the mlflow module, the tracking URI): uri, else $MLFLOW_TRACKING_URI, else MLflow's default local store,
    mlflow.db in this folder, by its absolute path (the URI printed works from anywhere); set to fail fast (no retries,
    10 s timeout) so that a dead server costs nothing. Imported here: only logging needs it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    return mlflow, uri


# -----------------------------------------------------------------------------
# The device


def pick_device(device="auto", dtype="auto"):
    """(device, dtype) with 'auto' resolved: a GPU if there is one (CUDA, else Apple's MPS), else the CPU; bfloat16
    autocast on a CUDA GPU, float32 elsewhere (a CPU with AMX units is faster in bfloat16: train_cifar_cpu.py)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return device, dtype if dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"


def autocast_context(device, dtype):
    """bf16 autocast on the device for dtype 'bfloat16', nothing otherwise (float32)."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def compile_model(model, device):
    """torch.compile(model). On a CPU, without Inductor's horizontal fusion of kernels: on an AVX-512 Xeon (Emerald
    Rapids) it made NaN gradients in bf16 for 64-token models (tests/test_train.py::test_compile_matches_eager)."""
    if device.startswith("cpu"):
        import torch._inductor.config

        torch._inductor.config.cpp.max_horizontal_fusion_size = 0
    return torch.compile(model)


# Dense bf16 matmul peak of known GPUs (datasheet numbers, FLOP/s), for MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12,
                  "A10": 125e12}


def gpu_peak_flops(device):
    """Peak bf16 FLOP/s of the device's GPU, e.g. 'NVIDIA H100 80GB HBM3'; None if unknown or not a CUDA GPU."""
    if not device.startswith("cuda"):
        return None
    return next((flops for name, flops in GPU_PEAK_FLOPS.items() if name in torch.cuda.get_device_name(device)), None)


def start_processes(device):
    """(device, rank, number of processes). Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) this joins the
    process group, NCCL on GPUs (one each) and gloo on CPUs; without it, (device, 0, 1)."""
    if "RANK" not in os.environ:
        return device, 0, 1
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def end_processes(code, message=""):
    """Exit with code (after one error line, given a message). Under torchrun leave the process group, then exit
    without interpreter teardown: it aborts (SIGABRT) if gloo's threads still free the last collective's tensors."""
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def first_failure(ok, device="cpu"):
    """The lowest rank among the processes for which ok is False, or None if every one is fine (a collective under
    torchrun: each process says how it fared, so that all go on, or all stop, together)."""
    rank, world = rank_and_world()
    failed = torch.tensor([rank if not ok else world], device=device)
    if world > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    return None if failed.item() == world else failed.item()


# -----------------------------------------------------------------------------
# Real images


def load_cifar10(download_dir, split):
    """(uint8 images (N, 3, 32, 32), int64 labels, class names) of CIFAR-10's 'train' or
    'test' split, downloaded once by torchvision into download_dir."""
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
    """uint8 (N, 3, H, W) from image files: resized and cropped to size x size, or, without
    size, as they are (then they must share one size)."""
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


# -----------------------------------------------------------------------------
# The prepared dataset


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


def real_images(name, data_dir="data"):
    """(files, description, read) of the images named: 'cifar10' (its 50,000 train images, from
    the torchvision download prepare_cifar.py shares), a prepared pixel dataset (its train
    split) or a folder of images; read() returns them as uint8 (N, 3, H, W)."""
    if name == "cifar10":
        return [], "CIFAR-10 train", lambda: load_cifar10(os.path.join(data_dir, "downloads"), "train")[0]
    if os.path.exists(os.path.join(name, "meta.json")):
        if load_meta(name)["kind"] != "pixels":
            raise DataError(f"{name} holds VAE latents, not images; pass its image source instead")
        return [os.path.join(name, "train.pt")], f"{name} (train split)", lambda: load_split(name, "train")[0]
    files = image_files(name)
    if not files:
        raise DataError(f"{name} holds no images ({', '.join(IMAGE_EXTENSIONS)})" if os.path.isdir(name) else
                        f"{name} is not 'cifar10', a statistics .npz, a prepared dataset or a folder of images")
    return files, name, lambda: read_images(files)


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
    """n random images and labels of a dataset held on the device, in model space; pixels are flipped left-right at
    random (each with probability 1/2) with flip, the one augmentation CIFAR models use (latents come flipped from
    prepare_cifar.py). All draws come from generator."""
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


# -----------------------------------------------------------------------------
# The VAE


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
    """The VAE's own convention, read from its config: z = (latent - shift) * scale.
    (SD 1.x/2.x VAEs have scale 0.18215 and no shift; SD3/Flux-style 16-channel ones have both.)"""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)


@torch.no_grad()
def encode(vae, images):
    """uint8 (B, 3, H, W) images -> latents z in the VAE's scaling convention, float32. Takes the mean of the encoder's
    distribution rather than a sample, so the dataset is deterministic."""
    scale, shift = vae_scaling(vae)
    latent = vae.encode(from_uint8(images.to(vae.device))).latent_dist.mean
    return ((latent - shift) * scale).float()


@torch.no_grad()
def to_images(x, meta, vae=None):
    """Model-space samples -> uint8 images. Latents: undo the per-channel normalisation,
    then the VAE's scaling convention, then run its decoder."""
    if meta["kind"] == "pixels":
        return to_uint8(x)
    if vae is None:
        raise DataError("latent samples need the VAE to become images")
    mean, std = latent_stats(meta, x.device)
    latent = (x.float() * std + mean) / meta["scaling_factor"] + meta["shift_factor"]
    return to_uint8(vae.decode(latent.to(vae.device)).sample)


def save_png(image_hwc, path):
    """Write a uint8 (H, W, 3) array as PNG, through a temporary file renamed into place."""
    from PIL import Image

    Image.fromarray(image_hwc).save(f"{path}.tmp.png")
    os.replace(f"{path}.tmp.png", path)


def write_atomically(final_dir, write):
    """write(tmp_dir) fills a temporary folder that then replaces final_dir in one rename,
    so a failed or interrupted run leaves the previous output as it was."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".tmp-{os.path.basename(final_dir)}-{os.getpid()}")
    old_dir = os.path.join(parent, f".old-{os.path.basename(final_dir)}-{os.getpid()}")
    try:
        os.makedirs(tmp_dir)
        write(tmp_dir)
        if os.path.exists(final_dir):
            os.rename(final_dir, old_dir)
        os.rename(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(old_dir, ignore_errors=True)
