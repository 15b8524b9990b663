import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Two CPU cores: keep torch from oversubscribing them when tests run subprocesses.
torch.set_num_threads(min(2, torch.get_num_threads()))
# The user's MLflow settings (an exported MLFLOW_TRACKING_URI for a team server, say) must
# neither change what the tests see nor receive their runs: every test names its own store.
for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
    del os.environ[key]
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


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


def run_script(script, *args, cwd, env=None, timeout=600):
    """Run one of the repo's scripts as a user would, from directory cwd."""
    import subprocess

    full_env = dict(
        os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", MLFLOW_DISABLE_TELEMETRY="true"
    )
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


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


TINY_TRAIN = [
    "--patch_size=2", "--batch_size=16", "--learning_rate=3e-3", "--flip=False", "--log_interval=10",
    "--eval_iters=2", "--samples_per_class=2", "--sample_steps=4", "--mlflow_log=False",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset):
    """out/ckpt.pt of a short train_debug.py run on the tiny dataset."""
    root = tiny_dataset.parent
    proc = run_script(
        "train.py", os.path.join(REPO, "config", "train_debug.py"), "--data_dir=data", "--dataset=tiny",
        "--out_dir=out", "--max_iters=100", "--eval_interval=100", *TINY_TRAIN, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    return root / "out" / "ckpt.pt"
