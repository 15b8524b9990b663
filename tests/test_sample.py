import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from conftest import REPO, TINY, TINY_TRAIN, assert_clean_failure, make_image_folder, make_tiny_vae, run_script

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
    assert eta == run("f", "--seed=7", "--sampler=ddim", "--eta=1.0", "--batch_size=3") and eta != a  # DDIM's noise too
    raw = run("g", "--seed=7", "--use_ema=False")
    assert raw != a
    dpm = run("h", "--seed=7", "--sampler=dpm++2m")  # a is the default, ddim
    assert dpm == run("i", "--seed=7", "--sampler=dpm++2m", "--batch_size=3") and dpm != a and dpm != eta

def test_every_image_of_a_set_differs_and_comes_from_the_ema(tiny_checkpoint, tmp_path):
    """No two images of a set are the same (each has its own noise), and they are the EMA weights' samples: the same
    images come from model.generate with the checkpoint's EMA weights, not with its raw ones."""
    from model import DiT, DiTConfig, NoiseSchedule, generate

    proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=all", "--num_per_class=4", "--steps=5", "--seed=5",
                  "--dtype=float32")
    assert proc.returncode == 0, proc.stderr
    names = [f for f in pngs(tmp_path / "samples") if f != "grid.png"]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "samples" / f))) for f in names]).permute(0, 3, 1, 2)
    assert len(names) == 12 and len({image.numpy().tobytes() for image in images}) == 12
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    labels = torch.arange(3).repeat_interleave(4)  # the files sort by class name: cat, dog, frog, as the classes are
    for weights, same in (("ema", True), ("model", False)):
        model = DiT(DiTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt[weights])
        x = generate(model.eval(), NoiseSchedule(**ckpt["noise_schedule"]), labels, (3, 8, 8), seed=5, steps=5, cfg_scale=1.5,
                     clip_x0=1.0)
        expected = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(images, expected) == same, weights

def test_autoguidance_steers_with_the_checkpoint_s_guide(tiny_checkpoint, tmp_path):
    """A checkpoint with a guide is sampled with autoguidance, the guide told no class (model.generate with guide=), at
    the checkpoint's sample_cfg_scale unless told another; --autoguidance=False, or a checkpoint without one, uses
    classifier-free guidance."""
    from model import DiT, DiTConfig, NoiseSchedule, generate

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["guide"], ckpt["config"]["guide_iter"] = ckpt["model"], 150  # the raw weights stand in for an earlier EMA
    ckpt["config"]["sample_cfg_scale"] = 2.0  # the scale sample.py uses unless told one
    torch.save(ckpt, tmp_path / "guided.pt")

    def images(*args):
        proc = sample(tmp_path, "--classes=all", "--num_per_class=2", "--steps=4", "--dtype=float32", *args)
        assert proc.returncode == 0, proc.stderr
        folder = tmp_path / "samples"
        files = [f for f in pngs(folder) if f != "grid.png"]
        return proc.stdout, torch.stack([torch.from_numpy(np.array(Image.open(folder / f))) for f in files])

    said, auto = images(f"--ckpt={tmp_path / 'guided.pt'}")
    assert "autoguidance 2" in said
    said, cfg = images(f"--ckpt={tmp_path / 'guided.pt'}", "--cfg_scale=2", "--autoguidance=False")
    assert "cfg_scale 2" in said and not torch.equal(auto, cfg)
    said, plain = images(f"--ckpt={tiny_checkpoint}", "--cfg_scale=2")
    assert "cfg_scale 2" in said and torch.equal(plain, cfg)
    ckpt["config"]["guide_iter"] = ckpt["iter_num"]  # written at guide_iter itself, where the guide is the model
    torch.save(ckpt, tmp_path / "at_guide_iter.pt")
    said, same = images(f"--ckpt={tmp_path / 'at_guide_iter.pt'}", "--cfg_scale=2")
    assert "cfg_scale 2" in said and torch.equal(same, cfg)
    nets = {}
    for weights in ("ema", "guide"):
        nets[weights] = DiT(DiTConfig(**ckpt["model_config"]))
        nets[weights].load_state_dict(ckpt[weights])
    x = generate(nets["ema"].eval(), NoiseSchedule(**ckpt["noise_schedule"]), torch.arange(3).repeat_interleave(2),
                 (3, 8, 8), steps=4, cfg_scale=2.0, clip_x0=1.0, guide=nets["guide"].eval())
    assert torch.equal(auto.permute(0, 3, 1, 2), ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))

def last_frame(folder, frames, row=0):
    """The last image of a row of trajectory.png, whose rows are 8x8 images with 2-pixel padding after a name margin."""
    trajectory = Image.open(folder / "trajectory.png").convert("RGB")
    margin = trajectory.size[0] - (frames * 10 + 2)
    x, y = margin + 2 + (frames - 1) * 10, 2 + row * 10
    return np.asarray(trajectory.crop((x, y, x + 8, y + 8))), trajectory

def test_trajectory(tiny_checkpoint, tmp_path):
    proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=cat,frog", "--num_per_class=2", "--steps=8",
                  "--trajectory=True", "--trajectory_frames=5")
    assert proc.returncode == 0, proc.stderr
    assert "trajectory.png (x_t)" in proc.stdout
    last, trajectory = last_frame(tmp_path / "samples", 5)
    grid = Image.open(tmp_path / "samples" / "grid.png").convert("RGB")
    assert trajectory.size[1] == 2 * 10 + 2  # one row per class
    assert trajectory.size[0] - (5 * 10 + 2) == grid.size[0] - (2 * 10 + 2)  # the same name margin
    # the last frame of each row is that row's first sample, with DDIM's fresh noise too
    for out, args in [("samples", []), ("eta", ["--eta=1.0", "--seed=3"])]:
        if args:
            proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=cat,frog", "--num_per_class=2", "--steps=8",
                          "--trajectory=True", "--trajectory_frames=5", f"--out_dir={out}", *args)
            assert proc.returncode == 0, proc.stderr
        for row, name in enumerate(["cat", "frog"]):
            expected = np.asarray(Image.open(tmp_path / out / f"{name}_0000.png").convert("RGB"))
            assert (last_frame(tmp_path / out, 5, row)[0] == expected).all(), (out, name)
    proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=cat", "--steps=4", "--trajectory=True",
                  "--trajectory_show=x0", "--out_dir=x0", "--sampler=dpm++2m")
    assert proc.returncode == 0 and "trajectory.png (x0)" in proc.stdout
    # with dpm++2m and x0 shown, the last of the 4 guesses is the sample itself
    assert (last_frame(tmp_path / "x0", 4)[0] == np.asarray(Image.open(tmp_path / "x0" / "cat_0000.png").convert("RGB"))).all()

def test_samples_follow_their_class(tiny_checkpoint, tiny_dataset, tmp_path):
    """Each class of the tiny dataset is its own pattern of dark and bright squares: every sample is nearest its own."""
    proc = sample(tmp_path, f"--ckpt={tiny_checkpoint}", "--classes=all", "--num_per_class=4", "--steps=10")
    assert proc.returncode == 0, proc.stderr
    train = torch.load(tiny_dataset / "tiny" / "train.pt", weights_only=True)
    means = torch.stack([train["x"][train["labels"] == c].float().mean(0) for c in range(3)])  # (3 classes, 3, 8, 8)
    for c, name in enumerate(["cat", "dog", "frog"]):
        for i in range(4):
            image = torch.from_numpy(np.asarray(Image.open(tmp_path / "samples" / f"{name}_{i:04d}.png"))).permute(2, 0, 1).float()
            distances = (image[None] - means).square().mean(dim=(1, 2, 3))
            assert distances.argmin() == c, (name, i, distances)

def test_the_newest_run_is_the_default(tiny_checkpoint, tmp_path):
    for run in ("out-older", "out-newer"):
        (tmp_path / run).mkdir()
        shutil.copy(tiny_checkpoint, tmp_path / run / "ckpt.pt")
        time.sleep(0.05)
    proc = sample(tmp_path, "--classes=dog", "--num_per_class=1", "--steps=2")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint: out-newer/ckpt.pt (the newest out*/ckpt.pt here" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(run_script("sample.py", "--classes=dog", cwd=empty), "no --ckpt given and no out*/ckpt.pt in this folder",
                         "train.py")

def test_a_checkpoint_of_an_older_layout(tiny_checkpoint, tmp_path):
    """Checkpoints from before the long skips, SwiGLU and RoPE (no 'layout' in them) get one line, in sample.py and
    when train.py resumes, and the file is left as it was."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    del ckpt["layout"]
    (tmp_path / "out").mkdir()
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    assert_clean_failure(run_script("sample.py", "--ckpt=out/ckpt.pt", cwd=tmp_path), "out/ckpt.pt is from an older model "
                         "layout (without the long skips, SwiGLU and RoPE)", "git checkout 93c525c")
    os.symlink(tiny_checkpoint.parent.parent / "data", tmp_path / "data")
    proc = run_script("train.py", *TINY, "--out_dir=out", "--init_from=resume", cwd=tmp_path)
    assert_clean_failure(proc, "out/ckpt.pt is from an older model layout")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before

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
    proc = run_script("sample.py", ck, "--classes=cat,dgo", cwd=tmp_path)
    assert_clean_failure(proc, "unknown class 'dgo'", "0=cat, 1=dog, 2=frog")
    proc = run_script("sample.py", ck, "--classes=3", cwd=tmp_path)
    assert_clean_failure(proc, "unknown class '3'", "0=cat")
    proc = run_script("sample.py", "--ckpt=nowhere/ckpt.pt", cwd=tmp_path)
    assert_clean_failure(proc, "no checkpoint nowhere/ckpt.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    proc = run_script("sample.py", "--ckpt=other.pt", cwd=tmp_path)
    assert_clean_failure(proc, "other.pt is not a nano-diffusion checkpoint")
    proc = run_script("sample.py", ck, "--steps=0", cwd=tmp_path)
    assert_clean_failure(proc, "steps must be at least 1")
    proc = run_script("sample.py", ck, "--sampler=dpm++2m", "--eta=1.0", cwd=tmp_path)
    assert_clean_failure(proc, "eta is DDIM's noise and dpm++2m is deterministic", "--sampler=ddim or --eta=0")
    proc = run_script("sample.py", ck, "--sampler=heun", cwd=tmp_path)
    assert_clean_failure(proc, "unknown sampler 'heun'; choose one of ddim, dpm++2m")
    proc = run_script("sample.py", ck, "--stpes=3", cwd=tmp_path)
    assert_clean_failure(proc, "unknown config key 'stpes'", "steps")
    assert_clean_failure(run_script("sample.py", ck, "--num_per_class=0", cwd=tmp_path), "num_per_class must be at least 1, got 0")
    assert_clean_failure(run_script("sample.py", ck, "--dtype=float16", cwd=tmp_path), "dtype must be 'bfloat16' or 'float32'")
    assert_clean_failure(run_script("sample.py", ck, "--trajectory=True", "--trajectory_show=eps", cwd=tmp_path),
                         "trajectory_show must be 'x_t' or 'x0'")
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
