"""
Train a class-conditional DiT on data made by prepare_cifar.py.

One GPU (or the CPU):
    python train.py config/train_cifar_pixels.py
    python train.py config/train_debug.py --device=cpu
Several GPUs on one machine, with DDP:
    torchrun --standalone --nproc_per_node=8 train.py config/train_cifar_pixels.py
Continue a run where it stopped:
    python train.py config/train_cifar_pixels.py --init_from=resume
"""

import copy
import importlib.util
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DataError, image_grid, load_meta, load_split, load_vae, one_line, save_png, to_images, to_model_space
from sample import sampler_settings
from model import DiT, DiTConfig, autocast_context, check_objective, diffusion_loss, generate, get_noise_schedule, gpu_peak_flops

# -----------------------------------------------------------------------------
# default config values: together they are the full config (python train.py --help lists them)
# I/O
out_dir = "out"  # checkpoints, sample grids
data_dir = "data"  # where prepare_cifar.py wrote the datasets
dataset = "cifar10_vae-kl-f8-d16_32"  # data_dir/<dataset>/{train,test}.pt and meta.json (prepare_cifar.py's default)
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
log_interval = 50  # iterations between log lines
eval_interval = 1000  # iterations between validation, sample grid and checkpoint
eval_iters = 20  # test-split batches per validation loss
patience = 0  # stop after this many evals without EMA val loss improvement (0: never)
# sample grids during training (EMA model, fixed noise, one row per class)
samples_per_class = 8  # images per row of the grid
sampler = "ddim"  # 'ddim' or 'dpm++2m' (also for FID)
sample_steps = 50  # sampler steps
sample_cfg_scale = 1.5  # classifier-free guidance scale (1 = no guidance)
# FID during training (fid.py; EMA model, sample_steps and sample_cfg_scale)
fid_interval = 0  # iterations between FID evaluations (0: off; a multiple of eval_interval)
fid_num_samples = 5000  # samples per FID (small-N FID is biased high: compare like with like)
fid_ref = ""  # real images: '' = the dataset's own train split for pixels, CIFAR-10 for latents
inception_weights = ""  # local FID Inception weights ('' = download to the torch hub cache)
# model (the data's shape and class count come from meta.json)
n_layer = 12
n_head = 12
n_embd = 768
patch_size = 1  # 4x4 latents -> 16 tokens
mlp_ratio = 4.0
dropout = 0.0
prediction = "v"  # the target: 'v' or 'eps' (VP schedules), 'velocity' (flow) or 'v' (flow)
# diffusion
noise_schedule = "cosine"  # 'linear', 'cosine' or 'sigmoid' (Chen 2023), or 'flow' (rectified flow)
schedule_start = None  # cosine/sigmoid start (None: the paper's default, 0 for cosine, -3 for sigmoid)
schedule_end = None  # cosine/sigmoid end (None: 1 for cosine, 3 for sigmoid)
schedule_tau = None  # cosine/sigmoid temperature (None: 1)
schedule_clip_min = None  # smallest gamma (None: 1e-9)
input_scale = 1.0  # b in Chen 2023: x0 is scaled by b before noising; b < 1 shifts towards noise
t_sampling = "uniform"  # 'uniform' or 'logit_normal' (SD3)
class_dropout = 0.1  # probability of training a label as "no class" (for guidance)
flip = True  # pixels: flip half of every batch left-right (latents come flipped from prepare_cifar.py)
# optimizer
batch_size = 256  # images per optimizer step, over all GPUs and accumulation steps
gradient_accumulation_steps = 1  # micro-steps per optimizer step
max_iters = 50000  # optimizer steps
lr_decay_iters = 0  # the cosine decay reaches min_lr here (0: at max_iters)
learning_rate = 1e-4  # peak learning rate
min_lr = 1e-5  # learning rate at the end of the cosine decay
lr_decay = "cosine"  # after warmup: 'cosine' (down to min_lr) or 'constant'
warmup_iters = 500  # linear warmup from 0
weight_decay = 0.0  # AdamW weight decay on matrices (DiT uses none)
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # clip the gradient norm to this (0: off)
ema_decay = 0.9999  # EMA of the weights; early on the decay is min(ema_decay, (1+n)/(10+n))
# system
device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype: 'bfloat16' or 'float32'
compile = False  # torch.compile the model
seed = 1337
# MLflow
mlflow_log = True  # log params, metrics and sample grids to MLflow
mlflow_tracking_uri = ""  # '' = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder
mlflow_experiment = "nano-diffusion"
mlflow_run_name = ""  # '' lets MLflow pick one
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in config_keys}  # everything above, as finally set
# -----------------------------------------------------------------------------


def fail(message):
    sys.exit(f"error: {message}")


# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0  # only rank 0 logs, samples and writes
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]

# --- check the settings before anything is written --------------------------------
if batch_size % (world_size * gradient_accumulation_steps):
    fail(
        f"batch_size {batch_size} is not divisible by {world_size} processes x "
        f"{gradient_accumulation_steps} accumulation steps; change --batch_size or --gradient_accumulation_steps"
    )
micro_batch = batch_size // (world_size * gradient_accumulation_steps)  # per process, per micro-step
if init_from not in ("scratch", "resume"):
    fail(f"init_from must be 'scratch' or 'resume', got {init_from!r}")
if lr_decay not in ("cosine", "constant"):
    fail(f"lr_decay must be 'cosine' or 'constant', got {lr_decay!r}")
if dtype not in ("bfloat16", "float32"):
    fail(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
data_path = os.path.join(data_dir, dataset)
try:
    meta = load_meta(data_path)
    x_train, y_train = load_split(data_path, "train")
    x_val, y_val = load_split(data_path, "test") if "test" in meta["splits"] else (x_train, y_train)
except DataError as e:
    fail(str(e))
if "test" not in meta["splits"] and master:
    print(f"note: {dataset} has no test split; validation loss is measured on train images")
schedule_params = dict(start=schedule_start, end=schedule_end, tau=schedule_tau, clip_min=schedule_clip_min)
try:
    model_config = DiTConfig(
        input_size=meta["shape"][1],
        in_channels=meta["shape"][0],
        patch_size=patch_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        mlp_ratio=mlp_ratio,
        num_classes=meta["num_classes"],
        dropout=dropout,
        prediction=prediction,
    )
    schedule = get_noise_schedule(
        noise_schedule, input_scale=input_scale, **{k: v for k, v in schedule_params.items() if v is not None}
    )
    check_objective(schedule, prediction)
    sampling = sampler_settings(sampler, sample_steps, sample_cfg_scale)
except ValueError as e:
    fail(f"{e} (dataset {dataset} is {'x'.join(map(str, meta['shape']))})")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
checkpoint = None
if init_from == "resume":
    if not os.path.exists(ckpt_path):
        fail(f"--init_from=resume but there is no {ckpt_path}; train from scratch first, or point --out_dir at a run")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved_model_config = checkpoint["model_config"]
    except Exception as e:
        fail(f"{ckpt_path} is not a nano-diffusion checkpoint ({one_line(e)})")
    different = {k: (v, saved_model_config.get(k)) for k, v in asdict(model_config).items() if saved_model_config.get(k) != v}
    if different:
        described = ", ".join(f"{k}={old!r} there, {new!r} here" for k, (new, old) in different.items())
        fail(f"{ckpt_path} holds a different model ({described}); use the settings it was trained with, or a new --out_dir")
elif os.path.exists(ckpt_path):
    fail(f"{ckpt_path} already exists; continue it with --init_from=resume, or pick another --out_dir")

# --- set up -------------------------------------------------------------------------------
torch.manual_seed(seed)  # the same initial weights on every process
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any float32 matmul left outside autocast
    torch.backends.cudnn.allow_tf32 = True
autocast = autocast_context(device, dtype)
if master:
    os.makedirs(out_dir, exist_ok=True)

# The whole dataset lives on the device; batches are random indices into it.
x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
if meta["kind"] == "latents":  # normalise once; pixels stay uint8 (4x smaller) until batched
    x_train, x_val = to_model_space(x_train, meta), to_model_space(x_val, meta)


def get_batch(x_all, y_all, n, generator=None):
    idx = torch.randint(len(x_all), (n,), device=device, generator=generator)
    x, y = x_all[idx], y_all[idx]
    if meta["kind"] == "pixels":
        x = to_model_space(x, meta)  # uint8 -> [-1, 1]
        if flip:
            flipped = torch.rand(n, device=device, generator=generator) < 0.5
            x = torch.where(flipped.view(n, 1, 1, 1), x.flip(3), x)
    return x, y


model = DiT(model_config).to(device)
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # evaluation and sampling use EMA
if checkpoint is not None:
    ema_model.load_state_dict(checkpoint["ema"])
# AdamW, with weight decay on tensors of 2 or more dimensions (weights, embeddings, tables), not on biases
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ],
    lr=learning_rate,
    betas=(beta1, beta2),
    fused=device_type == "cuda",
)
iter_num, best_val_loss, evals_without_improvement, mlflow_run_id = 0, float("inf"), 0, None
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    iter_num = checkpoint["iter_num"]
    best_val_loss = checkpoint["best_val_loss"]
    evals_without_improvement = checkpoint["evals_without_improvement"]
    mlflow_run_id = checkpoint["mlflow_run_id"]
    rng = checkpoint["rng"]
    if len(rng) == world_size:  # the exact random stream each process had: resume is exact
        torch.set_rng_state(rng[rank]["cpu"])
        if device_type == "cuda" and rng[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng[rank]["cuda"])
    else:
        torch.manual_seed(seed + rank + iter_num)
        if master:
            print(f"checkpoint was written by {len(rng)} processes, now {world_size}: random streams are new")
    checkpoint = None  # free the memory
else:
    torch.manual_seed(seed + rank)  # a different stream of batches and noise on each process

raw_model = model
if compile:
    print("compiling the model...")
    model = torch.compile(model)
eval_model = model  # rank 0 evaluates alone, so never through DDP (its forward talks to all ranks)
if ddp:
    # broadcast_buffers=False: the only buffer, pos_embed, is a constant
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_decay == "constant":
        return learning_rate
    decay_iters = lr_decay_iters or max_iters
    progress = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


ema_params, model_params = list(ema_model.parameters()), list(raw_model.parameters())


@torch.no_grad()
def update_ema(step):
    decay = min(ema_decay, (1 + step) / (10 + step))  # warmup: early EMA follows the weights
    torch._foreach_lerp_(ema_params, model_params, 1 - decay)  # ema += (1 - decay) * (w - ema), all at once


@torch.no_grad()
def validation_loss(net):
    """Mean loss over eval_iters test batches; a fixed generator makes every eval see the
    same images, times and noise, so the numbers are comparable from eval to eval."""
    was_training = net.training
    net.eval()
    generator = torch.Generator(device).manual_seed(seed)
    losses = torch.zeros(eval_iters, device=device)
    for k in range(eval_iters):
        x, y = get_batch(x_val, y_val, micro_batch, generator)
        with autocast:
            losses[k] = diffusion_loss(net, schedule, x, y, t_sampling, class_dropout, generator)
    net.train(was_training)
    return losses.mean().item()


# --- MLflow: imported only when logging is on; a failure warns once and logging stops -------
class MLflowLogger:
    def __init__(self):
        self.mlflow = None
        self.run_id = None

    def start(self, run_id):
        try:
            # fail fast against a dead server instead of retrying for minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            import mlflow

            uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
            mlflow.set_tracking_uri(uri)
            if run_id is None:
                mlflow.set_experiment(mlflow_experiment)
            system_metrics = importlib.util.find_spec("psutil") is not None
            run = mlflow.start_run(run_id=run_id, run_name=mlflow_run_name or None, log_system_metrics=system_metrics)
            self.mlflow, self.run_id = mlflow, run.info.run_id
            logged = run.data.params  # a resumed run keeps its first values
            self.call("log_params", {k: str(v)[:500] for k, v in config.items() if k not in logged})
            if self.mlflow is not None:
                print(f"MLflow: run {self.run_id} at {uri} (see it with: mlflow ui --backend-store-uri {uri})")
        except Exception as e:
            self.disable(e)

    def call(self, name, *args, **kwargs):
        if self.mlflow is None:
            return
        try:
            getattr(self.mlflow, name)(*args, **kwargs)
        except Exception as e:
            self.disable(e)

    def disable(self, error):
        warnings.warn(f"MLflow logging is off from here on: {type(error).__name__}: {str(error)[:300]}", stacklevel=2)
        self.mlflow = None

    def end(self):
        self.call("end_run")


logger = MLflowLogger()
if master and mlflow_log:
    logger.start(mlflow_run_id)

vae = None  # decodes latent samples; loaded at the first eval, False if it cannot be


def decoder_available():
    global vae
    if meta["kind"] == "latents" and vae is None:
        try:
            vae = load_vae(meta["vae"], device)
        except DataError as e:
            warnings.warn(f"no sample grids or FID: {e}", stacklevel=2)
            vae = False
    return vae is not False


def sample_grid():
    """Sample grid from the EMA model, one row per class, fixed noise -> HWC uint8, or None."""
    if not decoder_available():
        return None
    labels = torch.arange(meta["num_classes"]).repeat_interleave(samples_per_class)
    with autocast:
        samples = generate(
            ema_model, schedule, labels, meta["shape"], seed=seed, batch_size=max(micro_batch, 64),
            clip_x0=meta.get("clip_x0"), **sampling,
        )
    return image_grid(to_images(samples.to(device), meta, vae or None).cpu(), nrow=samples_per_class)


fid_scorer = None  # (Inception, reference mu, sigma) from the first FID eval; False if unavailable


def fid_score():
    """(metric name, FID of fid_num_samples EMA samples), or None when Inception or its
    reference statistics cannot be had."""
    global fid_scorer
    import fid  # imported here: only runs with fid_interval need it

    if fid_scorer is None:
        try:
            extractor = fid.load_inception(inception_weights, device)
            ref = fid_ref or (data_path if meta["kind"] == "pixels" else "cifar10")
            fid_scorer = (extractor, *fid.reference_statistics(ref, extractor, data_dir=data_dir))
        except DataError as e:
            warnings.warn(f"no FID during training: {e}", stacklevel=2)
            fid_scorer = False
    if fid_scorer is False or not decoder_available():
        return None
    extractor, ref_mu, ref_sigma = fid_scorer
    features = fid.sample_features(
        ema_model, schedule, meta, extractor, fid_num_samples, vae or None, seed=seed,
        batch_size=max(micro_batch, 64), autocast=autocast, **sampling,
    )
    score = fid.frechet_distance(*fid.statistics(features), ref_mu, ref_sigma)
    return fid.fid_metric_name(fid_num_samples), score


def save_checkpoint(path, rng_states):
    checkpoint = dict(
        model=raw_model.state_dict(),
        ema=ema_model.state_dict(),
        optimizer=optimizer.state_dict(),
        iter_num=iter_num,
        best_val_loss=best_val_loss,
        evals_without_improvement=evals_without_improvement,
        config=config,
        model_config=asdict(model_config),
        noise_schedule=asdict(schedule),
        meta=meta,
        rng=rng_states,
        mlflow_run_id=logger.run_id or mlflow_run_id,
    )
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint


def rng_states_of_all_processes():
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
    if not ddp:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def weights_checksum(net):
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in net.parameters()])


# --- the loop ---------------------------------------------------------------------------
flops_per_iter = raw_model.flops_per_image(training=True) * batch_size
peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
if master:
    print(
        f"{raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.grid_size**2} tokens per image, "
        f"data {dataset} ({meta['kind']}, {'x'.join(map(str, meta['shape']))}, {len(x_train)} train images), "
        f"batch {batch_size} = {world_size} processes x {gradient_accumulation_steps} steps x {micro_batch}, "
        f"{device} {dtype}{', compiled' if compile else ''}"
    )
model.train()
loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync until a log step
losses_since_log = 0
t_log = time.time()
stop_reason = None
try:
    while iter_num < max_iters:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(gradient_accumulation_steps):
            x, y = get_batch(x_train, y_train, micro_batch)
            # DDP averages gradients only on the last micro-step
            sync = nullcontext() if not ddp or micro_step == gradient_accumulation_steps - 1 else model.no_sync()
            with sync:
                with autocast:
                    loss = diffusion_loss(model, schedule, x, y, t_sampling, class_dropout)
                (loss / gradient_accumulation_steps).backward()
            loss_sum += loss.detach()
            losses_since_log += 1
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(iter_num)
        iter_num += 1

        if iter_num % log_interval == 0 or iter_num == max_iters:
            mean_loss = (loss_sum / losses_since_log).item()  # the one host sync, every log_interval
            if not math.isfinite(mean_loss):
                stop_reason = "nan"
                fail(
                    f"loss is {mean_loss} at iter {iter_num}; stopping, {ckpt_path} (if any) is the last good "
                    "checkpoint; try a lower --learning_rate or --grad_clip"
                )
            dt = (time.time() - t_log) / (losses_since_log / gradient_accumulation_steps)  # s per iter
            if master:
                images_per_sec = batch_size / dt
                mfu = flops_per_iter / dt / peak_flops if peak_flops else None
                eta = (max_iters - iter_num) * dt
                print(
                    f"iter {iter_num}: loss {mean_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                    f"{images_per_sec:.0f} img/s" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "")
                    + f", ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s",
                    flush=True,
                )
                metrics = {"train/loss": mean_loss, "lr": lr, "images_per_sec": images_per_sec}
                if mfu is not None:
                    metrics["mfu"] = mfu
                logger.call("log_metrics", metrics, step=iter_num)
            loss_sum.zero_()
            losses_since_log = 0
            t_log = time.time()

        if iter_num % eval_interval == 0 or iter_num == max_iters:
            rng_states = rng_states_of_all_processes()  # every process takes part
            if master:
                val_loss, ema_val_loss = validation_loss(eval_model), validation_loss(ema_model)
                print(f"iter {iter_num}: val loss {val_loss:.4f}, EMA val loss {ema_val_loss:.4f}")
                logger.call("log_metrics", {"val/loss": val_loss, "val/ema_loss": ema_val_loss}, step=iter_num)
                grid = sample_grid()
                if grid is not None:
                    grid_path = os.path.join(out_dir, f"samples_{iter_num:06d}.png")
                    save_png(grid, grid_path)
                    logger.call("log_image", grid, key="samples", step=iter_num)
                improved = ema_val_loss < best_val_loss
                if improved:
                    best_val_loss, evals_without_improvement = ema_val_loss, 0
                else:
                    evals_without_improvement += 1
                save_checkpoint(ckpt_path, rng_states)
                if improved:
                    save_checkpoint(os.path.join(out_dir, "best.pt"), rng_states)
                print(f"saved {ckpt_path}" + (" and best.pt" if improved else ""), flush=True)
            if master and fid_interval and iter_num % fid_interval == 0:
                result = fid_score()
                if result is not None:
                    name, score = result
                    print(f"iter {iter_num}: {name} {score:.3f}", flush=True)
                    logger.call("log_metrics", {name: score}, step=iter_num)
            if patience:
                stop = torch.tensor(int(master and evals_without_improvement >= patience), device=device)
                if ddp:
                    dist.broadcast(stop, 0)
                if stop.item():
                    stop_reason = "patience"
                    if master:
                        print(f"early stop: EMA val loss did not improve for {patience} evals")
                    break
            t_log = time.time()  # keep eval time out of ms/iter
except KeyboardInterrupt:
    if master and stop_reason is None:
        save_checkpoint(ckpt_path, [{"cpu": torch.get_rng_state(), "cuda": None}])
        print(f"\ninterrupted at iter {iter_num}; saved {ckpt_path}, continue with --init_from=resume")
    stop_reason = "interrupted"

if ddp and stop_reason != "interrupted":
    # every process must end with the same weights; a cheap check that DDP kept them in step
    checksums = [torch.zeros_like(weights_checksum(raw_model)) for _ in range(world_size)]
    dist.all_gather(checksums, weights_checksum(raw_model))
    if master:
        same = all(torch.equal(checksums[0], c) for c in checksums[1:])
        print(f"weights identical on all {world_size} processes: {same}")
if master:
    logger.end()
if ddp:
    dist.destroy_process_group()
