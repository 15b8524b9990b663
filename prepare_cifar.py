"""
Turn CIFAR-10 (or any folder of class sub-folders) into the tensors train.py reads, once, so that training never
decodes an image or runs the VAE.

    python prepare_cifar.py                                   # CIFAR-10 -> latents of the 16-channel VAE
    python prepare_cifar.py --vae=none                        # CIFAR-10 -> uint8 pixels
    python prepare_cifar.py --source=path/to/folder --vae=none --image_size=64

Writes data/<name>/train.pt, test.pt ({'x': tensor, 'labels': int64 tensor}) and meta.json. A folder with train/ and
test/ sub-folders gives both splits, one of class sub-folders a train split.
"""

import json
import os
import time

import numpy as np
import torch

from data import (IMAGE_EXTENSIONS, encode, image_files, load_cifar10, load_vae, read_images, resize_crop,
                  to_model_space, vae_scaling)
from runtime import DataError, fail, pick_device, progress, save_torch, write_folder

# --- default config values --------------------------------------------------------------------------------------------
source = "cifar10"  # 'cifar10' (downloaded with torchvision) or a folder with one sub-folder per class
download_dir = "data/downloads"  # where torchvision keeps the CIFAR-10 download
image_size = 32  # images are resized (shorter side) and centre-cropped to this size when they differ
vae = "ostris/vae-kl-f8-d16"  # diffusers AutoencoderKL: hub name or local folder; 'none' keeps pixels
flip = True  # latents only: also encode every horizontally flipped train image (pixels flip in train.py)
subset = 0  # keep only the first N images of each split (0 = all), for quick debugging
data_dir = "data"  # the dataset goes to data_dir/<out>
out = ""  # the dataset's folder name; '' makes one that says what it is
batch_size = 256  # images per VAE forward pass
device = "auto"  # where the VAE runs: 'auto' (a GPU if there is one, else the CPU), or e.g. 'cuda:1', 'cpu'
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
device = pick_device(device)[0]

def take_subset(labels, n):
    """Indices of the first n images, round-robin over classes so that every class appears."""
    if not n or n >= len(labels):
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [pc[rank] for rank in range(max(map(len, per_class))) for pc in per_class if rank < len(pc)]
    return np.sort(np.array(order[:n]))

def load_cifar10_splits():
    """{'train': (uint8 images (N, 3, H, W), labels), 'test': ...}, class names."""
    from PIL import Image
    splits = {}
    for split in ["train", "test"]:
        images, labels, classes = load_cifar10(download_dir, split)
        keep = take_subset(labels.numpy(), subset)
        images = images[keep]
        if image_size != 32:
            resized = [np.asarray(resize_crop(Image.fromarray(x.permute(1, 2, 0).numpy()), image_size)) for x in images]
            images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()
        splits[split] = (images, labels[keep])
    return splits, classes

def load_folder_split(folder, classes, what):
    """The images of folder/<class>/ for every class -> (uint8 images, labels)."""
    files, labels = [], []
    for label, name in enumerate(classes):
        if not os.path.isdir(os.path.join(folder, name)):
            raise DataError(f"{folder} has no sub-folder '{name}', but the train split has that class")
        found = image_files(os.path.join(folder, name))
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    keep = take_subset(np.array(labels), subset)
    return read_images([files[i] for i in keep], image_size, what), torch.tensor(labels)[keep]

def load_folder():
    """{'train': ..., 'test': ...} (test only with train/ and test/ sub-folders), class names."""
    if not os.path.isdir(source):
        raise DataError(f"--source={source} is not a folder (nor 'cifar10'); give a folder of class sub-folders")
    split_dirs = {s: os.path.join(source, s) for s in ["train", "test"] if os.path.isdir(os.path.join(source, s))}
    if "train" not in split_dirs:
        split_dirs = {"train": source}
    train_dir = split_dirs["train"]
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)) and d[0] != ".")
    if not classes:
        raise DataError(f"{train_dir} has no class sub-folders; expected {train_dir}/<class name>/<image files>")
    return {split: load_folder_split(folder, classes, split) for split, folder in split_dirs.items()}, classes

def encode_split(vae_model, images, labels, what, with_flips):
    """Latents of the images (and of their mirror images), float32 on the CPU."""
    batches, t0 = [], time.time()
    views = [images, images.flip(-1)] if with_flips else [images]
    with progress(sum(len(v) for v in views), f"encoding {what}") as bar:
        for view in views:
            for i in range(0, len(view), batch_size):
                batches.append(encode(vae_model, view[i : i + batch_size]).cpu())
                bar.update(len(batches[-1]))
    print(f"encoded {what}: {bar.n} images in {time.time() - t0:.1f} s")
    return torch.cat(batches), labels.repeat(len(views))

def default_name(source_name):
    parts = [source_name] + (["pixels"] + ([str(image_size)] if image_size != 32 else []) if vae == "none"
                             else [os.path.basename(os.path.normpath(vae)), str(image_size)])
    return "_".join(parts + ([f"subset{subset}"] if subset else []))

# -----------------------------------------------------------------------------
t_start = time.time()
if image_size < 8:
    fail(f"image_size must be at least 8, got {image_size}")
vae_model = None  # loaded first: if that fails, fail before minutes of image decoding
if vae != "none":
    print(f"loading VAE {vae} on {device}")
    try:
        vae_model = load_vae(vae, device)
    except DataError as e:
        fail(f"{e}, or --vae=none to keep pixels")
try:
    splits, classes = load_cifar10_splits() if source == "cifar10" else load_folder()
except DataError as e:
    fail(str(e))
name = out or default_name("cifar10" if source == "cifar10" else os.path.basename(os.path.normpath(source)))
meta = dict(kind="pixels" if vae_model is None else "latents", source=source, image_size=image_size,
            classes=list(classes), num_classes=len(classes), splits=list(splits))
tensors = {split: dict(x=images, labels=labels) for split, (images, labels) in splits.items()}
if vae_model is None:
    meta.update(channels=3, shape=[3, image_size, image_size], flipped_copies=False, clip_x0=1.0)
else:
    for split, t in tensors.items():
        t["x"], t["labels"] = encode_split(vae_model, t["x"], t["labels"], split, flip and split == "train")
    train_latents = tensors["train"]["x"]
    scale, shift = vae_scaling(vae_model)
    meta.update(channels=train_latents.shape[1], shape=list(train_latents.shape[1:]), vae=vae, scaling_factor=scale,
                shift_factor=shift, flipped_copies=bool(flip),
                # and the per-channel statistics train.py normalises with (sample.py undoes it)
                latent_mean=train_latents.mean(dim=(0, 2, 3)).tolist(),
                latent_std=train_latents.std(dim=(0, 2, 3)).tolist())
    # the largest |value| of the normalised train latents: samplers clip predicted x0 to it
    meta["clip_x0"] = to_model_space(train_latents, meta).abs().max().item()
    for split in tensors:  # float16 on disk: its rounding is far below the VAE's own error
        tensors[split]["x"] = tensors[split]["x"].half()
meta["counts"] = {split: len(t["labels"]) for split, t in tensors.items()}
meta["dtype"] = str(tensors["train"]["x"].dtype).replace("torch.", "")

def write(tmp_dir):
    for split, blob in tensors.items():
        save_torch(blob, os.path.join(tmp_dir, f"{split}.pt"))
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)

final_dir = os.path.join(data_dir, name)
try:
    write_folder(final_dir, write)
except DataError as e:
    fail(str(e))
size = sum(os.path.getsize(os.path.join(final_dir, f)) for f in os.listdir(final_dir))
print(f"wrote {final_dir} in {time.time() - t_start:.1f} s, {size / 2**20:.1f} MiB:")
for split, blob in tensors.items():
    print(f"  {split}: x {tuple(blob['x'].shape)} {meta['dtype']}, labels {tuple(blob['labels'].shape)} int64")
print(f"  {meta['num_classes']} classes: {', '.join(classes)}")
