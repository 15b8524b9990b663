import os

import numpy as np
import torch
from PIL import Image

from conftest import REPO, TINY_TRAIN, assert_clean_failure, make_image_folder, make_tiny_vae, run_script


def sample(cwd, *args):
    return run_script("sample.py", *args, cwd=cwd)


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def test_classes_by_id_and_name_grid_and_files(tiny_checkpoint, tmp_path):
    proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=0,dog,0", "--num_per_class=3", "--steps=5")
    assert proc.returncode == 0, proc.stderr
    assert "9 images of cat, dog" in proc.stdout and "images/s" in proc.stdout and "samples/grid.png" in proc.stdout
    files = pngs(tmp_path / "samples")
    assert files == [f"cat_{i:04d}.png" for i in range(6)] + [f"dog_{i:04d}.png" for i in range(3)] + ["grid.png"]
    assert Image.open(tmp_path / "samples" / "cat_0000.png").size == (8, 8)
    grid = Image.open(tmp_path / "samples" / "grid.png")
    assert grid.size[1] == 3 * 10 + 2 and grid.size[0] > 3 * 10 + 2  # 3 rows; names on the left
    # 'all' and a config file holding the class list
    (tmp_path / "two.py").write_text("classes = 'frog,cat'\nnum_per_class = 2\nsteps = 3\nout_dir = 'two'\n")
    proc = sample(tmp_path, "two.py", f"--ckpt={tiny_checkpoint}")
    assert proc.returncode == 0, proc.stderr
    assert pngs(tmp_path / "two") == ["cat_0000.png", "cat_0001.png", "frog_0000.png", "frog_0001.png", "grid.png"]
    proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=all", "--num_per_class=1", "--steps=2", "--out_dir=all")
    assert proc.returncode == 0 and len(pngs(tmp_path / "all")) == 4


def test_deterministic(tiny_checkpoint, tmp_path):
    def run(out, *args):
        proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=1,2", "--num_per_class=4", "--steps=5", f"--out_dir={out}", *args)
        assert proc.returncode == 0, proc.stderr
        return {f: (tmp_path / out / f).read_bytes() for f in pngs(tmp_path / out)}

    a = run("a", "--seed=7")
    assert a == run("b", "--seed=7", "--batch_size=3")  # byte-identical, whatever the batch size
    different = run("d", "--seed=8")
    assert all(a[f] != different[f] for f in a if f != "grid.png")
    eta = run("e", "--seed=7", "--sampler=ddim", "--eta=1.0")
    assert eta == run("f", "--seed=7", "--sampler=ddim", "--eta=1.0") and eta != a
    raw = run("g", "--seed=7", "--use_ema=False")
    assert raw != a
    dpm = run("h", "--seed=7", "--sampler=dpm++2m")  # a is the default, ddim
    assert dpm == run("i", "--seed=7", "--sampler=dpm++2m", "--batch_size=3") and dpm != a and dpm != eta


def test_trajectory(tiny_checkpoint, tmp_path):
    proc = sample(
        tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=cat,frog", "--num_per_class=2", "--steps=8",
        "--trajectory=True", "--trajectory_frames=5",
    )
    assert proc.returncode == 0, proc.stderr
    assert "trajectory.png (x_t)" in proc.stdout
    trajectory = Image.open(tmp_path / "samples" / "trajectory.png").convert("RGB")
    grid = Image.open(tmp_path / "samples" / "grid.png").convert("RGB")
    assert trajectory.size[1] == 2 * 10 + 2  # one row per class
    margin = trajectory.size[0] - (5 * 10 + 2)
    assert margin == grid.size[0] - (2 * 10 + 2)  # the same name margin
    # the last frame of each row is that row's first sample, the first frame is noise
    last = trajectory.crop((margin + 2 + 4 * 10, 2, margin + 2 + 4 * 10 + 8, 10))
    assert (np.asarray(last) == np.asarray(Image.open(tmp_path / "samples" / "cat_0000.png").convert("RGB"))).all()
    proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=cat", "--steps=4", "--trajectory=True",
                  "--trajectory_show=x0", "--out_dir=x0", "--sampler=dpm++2m")
    assert proc.returncode == 0 and "trajectory.png (x0)" in proc.stdout
    trajectory = Image.open(tmp_path / "x0" / "trajectory.png").convert("RGB")
    margin = trajectory.size[0] - (4 * 10 + 2)  # 4 frames: one x0 guess per step
    last = trajectory.crop((margin + 2 + 3 * 10, 2, margin + 2 + 3 * 10 + 8, 10))
    # with dpm++2m too, the last x0 guess is the sample itself
    assert (np.asarray(last) == np.asarray(Image.open(tmp_path / "x0" / "cat_0000.png").convert("RGB"))).all()


def test_latent_checkpoint_with_a_diffusers_vae(tiny_dataset, tmp_path):
    make_image_folder(tmp_path / "images", per_class=4)
    make_tiny_vae(tmp_path / "tiny_vae")
    proc = run_script("prepare_cifar.py", "--source=images", "--vae=tiny_vae", "--image_size=8", "--out=z", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_script(
        "train.py", os.path.join(REPO, "config", "train_debug.py"), "--dataset=z", "--out_dir=out", "--max_iters=20",
        "--eval_interval=20", *TINY_TRAIN, "--patch_size=1", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(tmp_path / "out" / "samples_000020.png")  # train.py decoded its grid with the VAE
    proc = sample(tmp_path, "--ckpt=out/ckpt.pt", "--classes=dog", "--num_per_class=2", "--steps=3")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "samples" / "dog_0000.png").size == (8, 8)  # decoded 4x4 latents

    os.rename(tmp_path / "tiny_vae", tmp_path / "moved_vae")
    proc = sample(tmp_path, "--ckpt=out/ckpt.pt", "--classes=dog", "--out_dir=nope")
    assert_clean_failure(proc, "could not load the VAE 'tiny_vae'", "--vae=path/to/vae")
    assert not os.path.exists(tmp_path / "nope")
    proc = sample(tmp_path, "--ckpt=out/ckpt.pt", "--classes=dog", "--num_per_class=1", "--steps=2", "--vae=moved_vae")
    assert proc.returncode == 0, proc.stderr


def test_bad_input(tiny_checkpoint, tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "keep.png").write_bytes(b"earlier output")
    ck = f"--ckpt={tiny_checkpoint}"
    proc = sample(tmp_path, ck, "--classes=cat,dgo")
    assert_clean_failure(proc, "unknown class 'dgo'", "0=cat, 1=dog, 2=frog")
    proc = sample(tmp_path, ck, "--classes=3")
    assert_clean_failure(proc, "unknown class '3'", "0=cat")
    proc = sample(tmp_path, "--ckpt=nowhere/ckpt.pt")
    assert_clean_failure(proc, "no checkpoint nowhere/ckpt.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    proc = sample(tmp_path, "--ckpt=other.pt")
    assert_clean_failure(proc, "other.pt is not a nano-diffusion checkpoint")
    proc = sample(tmp_path, ck, "--steps=0")
    assert_clean_failure(proc, "steps must be at least 1")
    proc = sample(tmp_path, ck, "--sampler=dpm++2m", "--eta=1.0")
    assert_clean_failure(proc, "eta is DDIM's noise and dpm++2m is deterministic", "--sampler=ddim or --eta=0")
    proc = sample(tmp_path, ck, "--sampler=heun")
    assert_clean_failure(proc, "unknown sampler 'heun'; choose one of ddim, dpm++2m")
    proc = sample(tmp_path, ck, "--stpes=3")
    assert_clean_failure(proc, "unknown config key 'stpes'", "steps")
    assert os.listdir(tmp_path / "samples") == ["keep.png"]  # nothing written or half-written
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


class Trap:
    """Pickles as a call of open(path, 'w'): loading it with weights_only=False creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_booby_trapped_checkpoint_is_refused_unread(tiny_dataset, tmp_path):
    marker = tmp_path / "the-trap-ran"
    (tmp_path / "out").mkdir()
    torch.save({"model": Trap(str(marker)), "ema": {}}, tmp_path / "out" / "ckpt.pt")
    os.symlink(tiny_dataset, tmp_path / "data")
    for script, args in [("sample.py", ["--ckpt=out/ckpt.pt"]), ("fid.py", ["--ckpt=out/ckpt.pt", "--num_samples=4"]),
                         ("train.py", [os.path.join(REPO, "config", "train_debug.py"), "--dataset=tiny", "--out_dir=out",
                                       "--init_from=resume"])]:
        proc = run_script(script, *args, cwd=tmp_path)
        assert_clean_failure(proc, "out/ckpt.pt would build the Python object io.open", "can run code", "not loaded")
        assert not marker.exists(), script
    torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)  # the trap is real: unsafe loading runs it
    assert marker.exists()
