import json
import os

import numpy as np
import torch
from PIL import Image

from conftest import REPO, assert_clean_failure, make_image_folder, make_tiny_vae, run_script

def prepare(tmp_path, *args):
    return run_script("prepare_cifar.py", *args, cwd=tmp_path)

def load(folder, split):
    return torch.load(os.path.join(folder, f"{split}.pt"), weights_only=True)

def test_pixels_round_trip(tmp_path):
    expected = make_image_folder(tmp_path / "pets")
    proc = prepare(tmp_path, "--source=pets", "--vae=none", "--image_size=8")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "data" / "pets_pixels_8"
    assert "wrote data/pets_pixels_8" in proc.stdout and "MiB" in proc.stdout
    for split in ["train", "test"]:
        blob = load(folder, split)
        assert blob["x"].dtype == torch.uint8 and blob["labels"].dtype == torch.int64
        assert torch.equal(blob["x"], expected[split][0])  # exact pixels, in file order
        assert torch.equal(blob["labels"], expected[split][1])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "pixels" and meta["classes"] == ["cat", "dog", "frog"]
    assert meta["num_classes"] == 3 and meta["shape"] == [3, 8, 8] and meta["image_size"] == 8
    assert meta["counts"] == {"train": 12, "test": 12} and meta["source"] == "pets"
    assert sorted(os.listdir(tmp_path / "data")) == ["pets_pixels_8"]  # no temporary folders left

def test_resize_subset_and_single_split(tmp_path):
    make_image_folder(tmp_path / "flat", classes=("a", "b"), per_class=5, size=12, splits=())
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "flat" / "a" / "wide.jpg")
    proc = prepare(tmp_path, "--source=flat", "--vae=none", "--image_size=8", "--subset=5", "--out=small")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "data" / "small"
    assert sorted(os.listdir(folder)) == ["meta.json", "train.pt"]  # a flat folder: train only
    blob = load(folder, "train")
    assert blob["x"].shape == (5, 3, 8, 8)
    assert blob["labels"].tolist() == [0, 0, 0, 1, 1]  # round-robin: both classes appear
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["splits"] == ["train"] and meta["counts"] == {"train": 5} and meta["shape"] == [3, 8, 8]
    # a wide image is resized on its short side and centre-cropped
    proc = prepare(tmp_path, "--source=flat", "--vae=none", "--image_size=8", "--out=all")
    x = load(tmp_path / "data" / "all", "train")["x"]
    assert x.shape == (11, 3, 8, 8)
    assert (x[5, 0] > 250).all() and (x[5, 1:] < 5).all()  # 'wide.jpg' sorts after 004.png

def test_images_in_a_class_folder_s_sub_folders_belong_to_that_class(tmp_path):
    make_image_folder(tmp_path / "nested", classes=("a", "b"), per_class=2, size=8, splits=())
    (tmp_path / "nested" / "b" / "more").mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "nested" / "b" / "more" / "x.png")
    proc = prepare(tmp_path, "--source=nested", "--vae=none", "--image_size=8", "--out=nested")
    assert proc.returncode == 0, proc.stderr
    blob = load(tmp_path / "data" / "nested", "train")
    assert blob["labels"].tolist() == [0, 0, 1, 1, 1]  # b/more/x.png is a 'b' image, not a class of its own
    assert (blob["x"][4, 2] > 250).all() and (blob["x"][4, :2] < 5).all()
    assert json.loads((tmp_path / "data" / "nested" / "meta.json").read_text())["classes"] == ["a", "b"]

def test_latents_with_a_real_diffusers_vae(tmp_path):
    images = make_image_folder(tmp_path / "pets")
    vae = make_tiny_vae(tmp_path / "tiny_vae")
    proc = prepare(tmp_path, "--source=pets", "--vae=tiny_vae", "--batch_size=5", "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "data" / "pets_tiny_vae_32"
    # image_size defaults to 32: the 8x8 images were upsampled, 32x32 -> 16x16 latents
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "latents" and meta["shape"] == [4, 16, 16] and meta["flipped_copies"]
    assert meta["scaling_factor"] == 0.5 and abs(meta["shift_factor"] - 0.1) < 1e-7 and meta["vae"] == "tiny_vae"
    train, test = load(folder, "train"), load(folder, "test")
    assert train["x"].shape == (24, 4, 16, 16) and test["x"].shape == (12, 4, 16, 16)  # flips doubled train only
    assert torch.equal(train["labels"], images["train"][1].repeat(2))
    z = train["x"].float()
    assert torch.allclose(torch.tensor(meta["latent_mean"]), z.mean(dim=(0, 2, 3)), atol=1e-3)
    assert torch.allclose(torch.tensor(meta["latent_std"]), z.std(dim=(0, 2, 3)), atol=1e-3)

    # The scaling convention, checked against diffusers directly on 8x8 inputs
    proc = prepare(tmp_path, "--source=pets", "--vae=tiny_vae", "--image_size=8", "--device=cpu", "--out=z8")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "data" / "z8" / "meta.json").read_text())
    stored = load(tmp_path / "data" / "z8", "train")["x"].float()
    x = images["train"][0].float() / 127.5 - 1
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.mean
        flipped = vae.encode(x.flip(-1)).latent_dist.mean
        expected = (torch.cat([latent, flipped]) - 0.1) * 0.5
        assert torch.allclose(stored, expected, atol=2e-3, rtol=2e-3)
        # decode(encode): the stored, normalised latents decode to what diffusers decodes
        from data import to_images, to_model_space, to_uint8

        normalised = to_model_space(stored[:12], meta)
        assert torch.allclose(normalised.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.3)
        ours = to_images(normalised, meta, vae)
        theirs = to_uint8(vae.decode(latent).sample)
        assert (ours.int() - theirs.int()).abs().max() <= 2

def make_cifar_download(folder, per_batch=4):
    """What torchvision's CIFAR-10 download leaves in folder: cifar-10-batches-py with five train
    pickles, a test pickle and batches.meta, here holding random 32x32 images, labelled 0, 1, 2, ...
    in turn. Returns ({split: (uint8 images (N, 3, 32, 32), labels)}, class names)."""
    import pickle

    rng, base, names = np.random.default_rng(0), folder / "cifar-10-batches-py", [f"class{i}" for i in range(10)]
    base.mkdir(parents=True)
    splits = {}
    for split, files in [("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])]:
        x = rng.integers(0, 256, (len(files) * per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [i % 10 for i in range(len(x))]
        for i, name in enumerate(files):
            rows = slice(i * per_batch, (i + 1) * per_batch)
            (base / name).write_bytes(pickle.dumps({"data": x[rows].reshape(per_batch, -1), "labels": labels[rows]}))
        splits[split] = (torch.from_numpy(x), torch.tensor(labels))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return splits, names

def test_cifar10_through_torchvision(tmp_path):
    """The CIFAR-10 path end to end on a download the test makes: only torchvision's md5 checks
    (which the fake files cannot pass; a failed one fetches the real archive) are switched off, in a process of its own."""
    from data import resize_crop

    expected, names = make_cifar_download(tmp_path / "data" / "downloads")
    (tmp_path / "no_md5.py").write_text(
        "import runpy, sys, torchvision.datasets.cifar\n"
        "torchvision.datasets.cifar.check_integrity = lambda *args: True\n"
        f"sys.argv[0], sys.path[0] = {os.path.join(REPO, 'prepare_cifar.py')!r}, {REPO!r}  # as if run directly\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    proc = run_script(tmp_path / "no_md5.py", "--vae=none", cwd=tmp_path, process=True)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "data" / "cifar10_pixels"
    for split in ["train", "test"]:  # exact pixels, channels first, in the download's order
        blob = load(folder, split)
        assert torch.equal(blob["x"], expected[split][0]) and torch.equal(blob["labels"], expected[split][1])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["classes"] == names and meta["counts"] == {"train": 20, "test": 4} and meta["source"] == "cifar10"

    proc = run_script(tmp_path / "no_md5.py", "--vae=none", "--image_size=16", "--subset=10", cwd=tmp_path,
                      process=True)
    assert proc.returncode == 0, proc.stderr
    train = load(tmp_path / "data" / "cifar10_pixels_16_subset10", "train")
    assert torch.equal(train["labels"], torch.arange(10))  # one image of each class: the first ten
    resized = [resize_crop(Image.fromarray(x.permute(1, 2, 0).numpy()), 16) for x in expected["train"][0][:10]]
    assert torch.equal(train["x"], torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2))

    (tmp_path / "a_file").write_text("")  # no download can go there: the one-line error, before any network
    proc = prepare(tmp_path, "--vae=none", "--download_dir=a_file")
    assert_clean_failure(proc, "could not download CIFAR-10 to a_file", "give a folder of images instead")

def test_errors_leave_nothing_behind(tmp_path):
    make_image_folder(tmp_path / "pets")
    assert prepare(tmp_path, "--source=pets", "--vae=none", "--out=keep").returncode == 0
    before = (tmp_path / "data" / "keep" / "train.pt").read_bytes()

    proc = run_script("prepare_cifar.py", "--source=nowhere", "--vae=none", "--out=keep", cwd=tmp_path)
    assert_clean_failure(proc, "nowhere", "is not a folder")

    (tmp_path / "empty" / "nothing_here").mkdir(parents=True)
    (tmp_path / "flat_files").mkdir()
    (tmp_path / "flat_files" / "x.png").write_bytes(b"")
    proc = run_script("prepare_cifar.py", "--source=flat_files", "--vae=none", "--out=keep", cwd=tmp_path)
    assert_clean_failure(proc, "has no class sub-folders")
    proc = run_script("prepare_cifar.py", "--source=empty", "--vae=none", "--out=keep", cwd=tmp_path)
    assert_clean_failure(proc, "holds no images")

    (tmp_path / "pets" / "test" / "dog" / "broken.png").write_bytes(b"not a png at all")
    proc = run_script("prepare_cifar.py", "--source=pets", "--vae=none", "--out=keep", cwd=tmp_path)
    assert_clean_failure(proc, "cannot read image", os.path.join("test", "dog", "broken.png"))

    proc = prepare(tmp_path, "--source=pets", "--vae=nobody/no-such-vae", "--out=keep")  # offline
    assert_clean_failure(proc, "could not load the VAE 'nobody/no-such-vae'", "--vae=path/to/vae", "--vae=none")

    proc = run_script("prepare_cifar.py", "--source=pets", "--vea=none", cwd=tmp_path)
    assert_clean_failure(proc, "unknown config key 'vea'", "vae")

    assert sorted(os.listdir(tmp_path / "data")) == ["keep"]
    assert (tmp_path / "data" / "keep" / "train.pt").read_bytes() == before

def test_get_batch_flips_half_of_the_pixels_left_right():
    """train.py's batches: random images of the dataset in [-1, 1], half of them mirrored with flip, none without."""
    from data import get_batch

    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(64)  # the label says which image a sample came from
    for flip in (True, False):
        batch, y = get_batch(x, labels, 4000, {"kind": "pixels"}, flip, torch.Generator().manual_seed(0))
        source = x[y].float() / 127.5 - 1
        same, mirrored = ((batch == s).flatten(1).all(1) for s in (source, source.flip(3)))
        assert (same | mirrored).all() and batch.min() >= -1 and batch.max() <= 1
        assert abs(mirrored.float().mean() - 0.5) < 0.03 if flip else not mirrored.any()
        assert torch.equal(batch, get_batch(x, labels, 4000, {"kind": "pixels"}, flip, torch.Generator().manual_seed(0))[0])
