"""The checkpoint format: how train.py writes ckpt.pt and best.pt, how scripts read them, what resume may not change."""

import glob
import os
import re
from dataclasses import asdict

import torch

from model import DiT, DiTConfig, NoiseSchedule
from runtime import DataError, one_line, save_file, save_torch

LAYOUT = 2  # the network's parameter layout: 2 since the long skips, SwiGLU and RoPE; older files cannot be built

def write_checkpoint(path, **state):
    """Write state (and LAYOUT) to path; a crash or a full disk mid-write keeps the old file (runtime.save_file)."""
    save_file(path, lambda tmp: save_torch(dict(state, layout=LAYOUT), tmp))

def read_checkpoint(path, if_missing="train one with train.py, or pass --ckpt=path/to/ckpt.pt"):
    """The dict in a train.py checkpoint: only tensors, numbers, strings, lists and dicts, so it is read weights_only,
    and a file whose pickle would build another object (how a booby-trapped checkpoint runs code) is refused unread."""
    if not os.path.exists(path):
        raise DataError(f"no checkpoint {path}; {if_missing}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if missing := {"model", "ema", "model_config", "noise_schedule", "meta"} - set(checkpoint):
            raise ValueError(f"it has no {', '.join(sorted(missing))}")
    except Exception as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names what it refused to build
        if unsafe:
            raise DataError(f"{path} would build the Python object {unsafe.group(1)} when loaded, which can run code; "
                            "nano-diffusion checkpoints never do, so it was not loaded") from e
        raise DataError(f"{path} is not a nano-diffusion checkpoint written by train.py ({one_line(e)})") from e
    if checkpoint.get("layout", 1) != LAYOUT:
        raise DataError(f"{path} is from an older model layout (without the long skips, SwiGLU and RoPE), which this "
                        "code cannot build; train anew, or read it with the code of that layout: git checkout 93c525c")
    return checkpoint

def find_checkpoint(path="", quiet=False):
    """path, or if it is '' the newest out*/ckpt.pt in this folder (where train.py's configs put their runs)."""
    if path:
        return path
    found = sorted(glob.glob(os.path.join("out*", "ckpt.pt")), key=os.path.getmtime)
    if not found:
        raise DataError("no --ckpt given and no out*/ckpt.pt in this folder; train one with train.py, or pass "
                        "--ckpt=path/to/ckpt.pt")
    if not quiet:
        print(f"checkpoint: {found[-1]} (the newest out*/ckpt.pt here; --ckpt=... picks another)")
    return found[-1]

def build_model(checkpoint, weights, device, path):
    """The DiT of a checkpoint with its weights named weights ('ema', 'model' or 'guide'), in eval mode."""
    try:
        model = DiT(DiTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint[weights])
    except Exception as e:
        raise DataError(f"{path} holds a model this code cannot build ({one_line(e)})") from e
    return model.to(device).eval()

def load_checkpoint(path, use_ema=True, device="cpu"):
    """(model in eval mode, noise schedule, data meta, checkpoint dict) from a train.py checkpoint."""
    checkpoint = read_checkpoint(path)
    model = build_model(checkpoint, "ema" if use_ema else "model", device, path)
    return model, NoiseSchedule(**checkpoint["noise_schedule"]), checkpoint["meta"], checkpoint

def load_guide(checkpoint, device, path):
    """Autoguidance's guide, the EMA weights that train.py kept at guide_iter; None without one, or at guide_iter itself,
    where the guide is the model."""
    if checkpoint.get("guide") is None or checkpoint["iter_num"] <= checkpoint["config"].get("guide_iter", 0):
        return None
    return build_model(checkpoint, "guide", device, path)

def fixed_settings(model_config, schedule, meta, optimizer):
    """The settings a resumed run must keep, by train.py's key names: what the network computes and what its output
    means (sizes, target, noise schedule, data), and the optimizer, whose state cannot move to another."""
    settings = dict(asdict(model_config), noise_schedule=schedule.name, input_scale=schedule.input_scale)
    settings |= {f"schedule_{k}": v for k, v in schedule.params.items()}
    return settings | dict(data=meta["kind"], classes=meta["classes"], vae=meta.get("vae"), optimizer=optimizer)

def check_resumable(checkpoint, path, model_config, schedule, meta, optimizer):
    """ValueError naming every fixed setting (fixed_settings) in which this run differs from the checkpoint."""
    theirs = fixed_settings(DiTConfig(**checkpoint["model_config"]), NoiseSchedule(**checkpoint["noise_schedule"]),
                            checkpoint["meta"], checkpoint["config"]["optimizer"])
    ours = fixed_settings(model_config, schedule, meta, optimizer)
    if different := [f"{k}={theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]:
        raise ValueError(f"{path} holds a different model ({', '.join(different)}); resume with its settings, or train "
                         "anew with another --out_dir")
