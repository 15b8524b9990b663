"""
What every script runs on besides the model and the data: one-line user errors, progress bars, the device, the processes
under torchrun and how they fail together, writes that never leave half a file, and MLflow.
"""

import io
import os
import shutil
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

class DataError(RuntimeError):
    """A problem with what the user gave (data, a checkpoint, a VAE, a full disk); the message says what to do."""

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

# --- the device -------------------------------------------------------------------------------------------------------

def pick_device(device="auto", dtype="auto"):
    """(device, dtype, why) with 'auto' resolved: a GPU if there is one, else the CPU; bfloat16 where the hardware has
    it (a CUDA GPU, a CPU with AMX or AVX512-BF16: 1.3-1.7x faster), else float32 (emulated bf16 is slower still)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype != "auto":
        return device, dtype, f"{dtype}, as asked"
    if device.startswith("cuda"):
        return device, "bfloat16", "bfloat16 autocast: a CUDA GPU computes it natively"
    if device == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        units = "AMX" if torch.cpu._is_amx_tile_supported() else "AVX512-BF16"
        return device, "bfloat16", f"bfloat16 autocast: this CPU has {units} units, faster than float32"
    why = "this CPU has no AMX or AVX512-BF16 units" if device == "cpu" else f"no bf16 autocast on {device} here"
    return device, "float32", f"float32: {why}"

def autocast_context(device, dtype):
    """bf16 autocast on the device for dtype 'bfloat16', nothing otherwise (float32)."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

def compile_model(model, device):
    """torch.compile(model), on a CPU without Inductor's horizontal fusion: it made NaN bf16 gradients on a Xeon."""
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

# --- processes: one, or several under torchrun ------------------------------------------------------------------------

def start_processes(device):
    """(device, rank, number of processes), joining the process group under torchrun: NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return device, 0, 1
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device, dist.get_rank(), dist.get_world_size()

def end_processes(code, message=""):
    """Exit with code, after one error line if given a message. Under torchrun, leave the process group and skip the
    interpreter's teardown: it aborts (SIGABRT) if gloo's threads still free the last collective's tensors."""
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

def first_problem(problem, device="cpu"):
    """How every process fails together: each says what went wrong for it (a message, or None); all get None if none
    had a problem, else the lowest failing rank's problem there and '' elsewhere: all stop, and one line says why."""
    rank, world = rank_and_world()
    failed = torch.tensor([world if problem is None else rank], device=device)
    if world > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    if failed.item() == world:
        return None
    return problem if failed.item() == rank else ""

# --- writes: a file is either the old one or the new one, never half of one -------------------------------------------

def save_file(path, write):
    """write(tmp) fills a temporary file beside path (its folder made) that then replaces it in one rename. A failed
    write (a full disk) removes the temporary file, leaves path as it was, and becomes a DataError that says why."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"could not write {path} ({e.strerror or one_line(e)})") from e

def save_torch(obj, path):
    """torch.save(obj, path), serialised in memory first: torch's own file writer reports a full disk as 'unexpected
    pos', without the reason, where a Python file raises an OSError that says it ('No space left on device')."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())

def write_folder(final_dir, write):
    """save_file for a folder: a failed or interrupted run leaves the previous final_dir as it was."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    tmp_dir = os.path.join(parent, f".tmp-{os.path.basename(final_dir)}-{os.getpid()}")
    old_dir = os.path.join(parent, f".old-{os.path.basename(final_dir)}-{os.getpid()}")
    try:
        os.makedirs(tmp_dir)
        write(tmp_dir)
        if os.path.exists(final_dir):
            os.rename(final_dir, old_dir)
        os.rename(tmp_dir, final_dir)
    except OSError as e:
        kept = f"; {final_dir} is as it was" if os.path.exists(final_dir) else ""
        raise DataError(f"could not write {final_dir} ({e.strerror or one_line(e)}){kept}") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(old_dir, ignore_errors=True)

# --- MLflow: imported where it is used (it takes seconds), and never the reason a run stops ---------------------------

def mlflow_tracking(uri=""):
    """(mlflow, the tracking URI): uri, else $MLFLOW_TRACKING_URI, else mlflow.db in this folder by its absolute path
    (so the URI printed works anywhere); no retries and a 10 s timeout, so that a dead server costs nothing."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    return mlflow, uri

class MLflowLog:
    """mlflow.<method>(...) as log(method, ...) on rank 0; a failure warns once and turns logging off: never a stop."""

    def __init__(self, enabled, uri=""):
        self.mlflow, self.uri = None, uri
        if enabled and rank_and_world()[0] == 0:
            try:
                self.mlflow, self.uri = mlflow_tracking(uri)
            except Exception as e:  # no mlflow installed, a bad URI
                warn(f"no MLflow logging: {one_line(e)} (pip install mlflow, or --mlflow_log=False)")

    def __call__(self, method, *args, **kwargs):
        try:
            return getattr(self.mlflow, method)(*args, **kwargs) if self.mlflow else None
        except Exception as e:
            warn(f"MLflow logging is off from here on: {one_line(e, 300)}")
            self.mlflow = None
