"""
Turn CIFAR-10 (or any folder of class sub-folders) into the tensors train.py reads,
once, so that training never decodes an image or runs the VAE.

    python prepare_cifar.py                                   # CIFAR-10 -> latents of the 16-channel VAE
    python prepare_cifar.py --vae=none                        # CIFAR-10 -> uint8 pixels
    python prepare_cifar.py --source=path/to/folder --vae=none --image_size=64

Writes data/<name>/train.pt, test.pt ({'x': tensor, 'labels': int64 tensor}) and
meta.json. A folder with train/ and test/ sub-folders gives both splits; a folder of
class sub-folders gives a train split only.
"""

import json
import os
import sys
import time

import numpy as np
import torch

from data import IMAGE_EXTENSIONS, DataError, encode, load_vae, one_line, to_model_space, vae_scaling, write_atomically

# -----------------------------------------------------------------------------
# default config values
source = "cifar10"  # 'cifar10' (downloaded with torchvision) or a folder with one sub-folder per class
download_dir = "data/downloads"  # where torchvision keeps the CIFAR-10 download
image_size = 32  # images are resized (shorter side) and centre-cropped to this size when they differ
vae = "ostris/vae-kl-f8-d16"  # diffusers AutoencoderKL: hub name or local folder; 'none' keeps pixels
flip = True  # latents only: also encode every horizontally flipped train image (pixels flip in train.py)
subset = 0  # keep only the first N images of each split (0 = all), for quick debugging
data_dir = "data"  # the dataset goes to data_dir/<out>
out = ""  # the dataset's folder name; '' makes one that says what it is
batch_size = 256  # images per VAE forward pass
device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------


def fail(message):
    sys.exit(f"error: {message}")


def progress(what, done, total, t0):
    rate = done / max(time.time() - t0, 1e-9)
    print(f"{what}: {done}/{total} images, {rate:.0f} images/s", flush=True)


def to_size(image):
    """PIL image -> uint8 (3, image_size, image_size): shorter side resized, centre cropped."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        w, h = image.size
        scale = image_size / min(w, h)
        image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def take_subset(labels, n):
    """Indices of the first n images, round-robin over classes so that every class appears."""
    if not n or n >= len(labels):
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [idx for rank in range(max(map(len, per_class))) for idx in (pc[rank] for pc in per_class if rank < len(pc))]
    return np.sort(np.array(order[:n]))


def load_cifar10():
    """{'train': (images uint8 (N, 3, H, W), labels), 'test': ...}, class names."""
    import torchvision

    splits = {}
    for split in ["train", "test"]:
        try:
            dataset = torchvision.datasets.CIFAR10(download_dir, train=(split == "train"), download=True)
        except Exception as e:
            fail(
                f"could not download CIFAR-10 to {download_dir} ({one_line(e)}); "
                "without network, pass an image folder with --source=path/to/folder"
            )
        labels = np.array(dataset.targets)
        keep = take_subset(labels, subset)
        images = torch.from_numpy(dataset.data[keep]).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        if image_size != 32:
            from PIL import Image

            images = torch.stack([to_size(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
        splits[split] = (images.contiguous(), torch.from_numpy(labels[keep]).long())
    return splits, dataset.classes


def list_class_folders(folder):
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if not classes:
        fail(f"{folder} has no class sub-folders; expected {folder}/<class name>/<image files>")
    return classes


def load_folder_split(folder, classes, what):
    from PIL import Image

    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        if not os.path.isdir(class_dir):
            fail(f"{folder} has no sub-folder '{name}', but the train split has that class")
        names = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        files += [os.path.join(class_dir, f) for f in names]
        labels += [label] * len(names)
    if not files:
        fail(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    labels = np.array(labels)
    keep = take_subset(labels, subset)
    images, t0 = [], time.time()
    for i, idx in enumerate(keep):
        try:
            with Image.open(files[idx]) as image:
                images.append(to_size(image))
        except Exception as e:
            fail(f"cannot read image {files[idx]} ({one_line(e)}); remove or replace it")
        if (i + 1) % 10000 == 0 or i + 1 == len(keep):
            progress(f"reading {what}", i + 1, len(keep), t0)
    return torch.stack(images), torch.from_numpy(labels[keep]).long()


def load_folder():
    if not os.path.isdir(source):
        fail(f"--source={source} is not a folder (nor 'cifar10'); give a folder of class sub-folders")
    if os.path.isdir(os.path.join(source, "train")):
        train_dir = os.path.join(source, "train")
        classes = list_class_folders(train_dir)
        splits = {"train": load_folder_split(train_dir, classes, "train")}
        if os.path.isdir(os.path.join(source, "test")):
            splits["test"] = load_folder_split(os.path.join(source, "test"), classes, "test")
        return splits, classes
    classes = list_class_folders(source)
    return {"train": load_folder_split(source, classes, "train")}, classes


def encode_split(vae_model, images, labels, what, with_flips):
    """Latents of the images (and of their mirror images), float32 on the CPU."""
    batches, t0 = [], time.time()
    views = [images, images.flip(-1)] if with_flips else [images]
    total = sum(len(v) for v in views)
    for view in views:
        for i in range(0, len(view), batch_size):
            batches.append(encode(vae_model, view[i : i + batch_size]).cpu())
            done = sum(len(b) for b in batches)
            if done % (20 * batch_size) < batch_size or done == total:
                progress(f"encoding {what}", done, total, t0)
    return torch.cat(batches), labels.repeat(len(views))


def default_name(source_name):
    parts = [source_name]
    if vae == "none":
        parts.append("pixels")
        if image_size != 32:
            parts.append(str(image_size))
    else:
        parts += [os.path.basename(os.path.normpath(vae)), str(image_size)]
    if subset:
        parts.append(f"subset{subset}")
    return "_".join(parts)


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


# -----------------------------------------------------------------------------
t_start = time.time()
if image_size < 8:
    fail(f"image_size must be at least 8, got {image_size}")
# Load the VAE first: if that fails, fail before minutes of image decoding.
vae_model = None
if vae != "none":
    print(f"loading VAE {vae} on {device}")
    try:
        vae_model = load_vae(vae, device)
    except DataError as e:
        fail(f"{e}, or --vae=none to keep pixels")
if source == "cifar10":
    splits, classes = load_cifar10()
    source_name = "cifar10"
else:
    splits, classes = load_folder()
    source_name = os.path.basename(os.path.normpath(source))
name = out or default_name(source_name)
final_dir = os.path.join(data_dir, name)

meta = dict(
    kind="pixels" if vae_model is None else "latents",
    source=source,
    image_size=image_size,
    classes=list(classes),
    num_classes=len(classes),
    splits=list(splits),
)
tensors = {}
if vae_model is None:
    for split, (images, labels) in splits.items():
        tensors[split] = dict(x=images, labels=labels)
    meta.update(channels=3, shape=[3, image_size, image_size], flipped_copies=False, clip_x0=1.0)
else:
    for split, (images, labels) in splits.items():
        latents, latent_labels = encode_split(vae_model, images, labels, split, flip and split == "train")
        tensors[split] = dict(x=latents, labels=latent_labels)
    train_latents = tensors["train"]["x"]
    scale, shift = vae_scaling(vae_model)
    meta.update(
        channels=train_latents.shape[1],
        shape=list(train_latents.shape[1:]),
        vae=vae,
        scaling_factor=scale,
        shift_factor=shift,
        # train.py normalises each channel with these; sample.py undoes it before decoding
        latent_mean=train_latents.mean(dim=(0, 2, 3)).tolist(),
        latent_std=train_latents.std(dim=(0, 2, 3)).tolist(),
        flipped_copies=bool(flip),
    )
    # the largest |value| of the normalised train latents: samplers clip predicted x0 to it
    meta["clip_x0"] = to_model_space(train_latents, meta).abs().max().item()
    for split in tensors:  # float16 on disk: its rounding is far below the VAE's own error
        tensors[split]["x"] = tensors[split]["x"].half()
meta["counts"] = {split: len(t["labels"]) for split, t in tensors.items()}
meta["dtype"] = str(tensors["train"]["x"].dtype).replace("torch.", "")

def write(tmp_dir):
    for split, blob in tensors.items():
        torch.save(blob, os.path.join(tmp_dir, f"{split}.pt"))
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)

write_atomically(final_dir, write)
print(f"wrote {final_dir} in {time.time() - t_start:.1f} s, {folder_size(final_dir) / 2**20:.1f} MiB:")
for split, blob in tensors.items():
    print(f"  {split}: x {tuple(blob['x'].shape)} {meta['dtype']}, labels {tuple(blob['labels'].shape)} int64")
print(f"  {meta['num_classes']} classes: {', '.join(classes)}")
