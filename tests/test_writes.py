"""Writes the disk refuses (a full disk, here a file-size limit): one line that says what and why, a non-zero exit, the
old file kept, and nothing half-written left behind."""
import contextlib
import resource

from conftest import TINY, assert_clean_failure, make_image_folder, run_script

@contextlib.contextmanager
def file_size_limit(nbytes):
    """No file this process writes may grow past nbytes (RLIMIT_FSIZE): a write past it fails with EFBIG, 'File too
    large', as one past a full disk fails with ENOSPC. (Python ignores the SIGXFSZ that comes with it.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.startswith((".tmp", ".old"))]

def test_a_checkpoint_that_cannot_be_written(cwd):
    assert run_script("train.py", *TINY, "--max_iters=20", cwd=cwd).returncode == 0
    kept = (cwd / "out-debug" / "ckpt.pt").read_bytes()
    with file_size_limit(1_000_000):  # the sample grid fits, the checkpoint (2.8 MB) does not
        proc = run_script("train.py", *TINY, "--max_iters=40", "--init_from=resume", cwd=cwd)
    assert_clean_failure(proc, "could not write out-debug/ckpt.pt (File too large)", "stopped at iter 40",
                         "out-debug/ckpt.pt (iter 20) is the last good checkpoint", "continue with --init_from=resume")
    assert (cwd / "out-debug" / "ckpt.pt").read_bytes() == kept and not leftovers(cwd / "out-debug")
    assert (cwd / "out-debug" / "samples_000040.png").exists()  # what could be written was

def test_a_dataset_sample_folder_or_statistics_that_cannot_be_written(tiny_checkpoint, random_inception_weights, tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    with file_size_limit(1000):
        proc = run_script("prepare_cifar.py", "--source=images", "--vae=none", "--image_size=8", "--out=tiny", "--data_dir=data",
                          cwd=tmp_path)
    assert_clean_failure(proc, "could not write data/tiny (File too large)")
    assert not (tmp_path / "data" / "tiny").exists() and not leftovers(tmp_path / "data")

    sample = ["sample.py", f"--ckpt={tiny_checkpoint}", "--classes=cat,dog", "--num_per_class=2", "--steps=2"]
    assert run_script(*sample, cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "samples").iterdir()}
    with file_size_limit(100):  # less than one 8x8 PNG
        proc = run_script(*sample, "--seed=1", cwd=tmp_path)
    assert_clean_failure(proc, "could not write samples (File too large); samples is as it was")
    assert {p.name: p.read_bytes() for p in (tmp_path / "samples").iterdir()} == before and not leftovers(tmp_path)

    fid = ["fid.py", "--images=images", "--ref=images", f"--inception_weights={random_inception_weights}", "--stats_out=stats.npz"]
    with file_size_limit(1_000_000):  # statistics are 32 MB: neither the reference cache nor --stats_out fits
        proc = run_script(*fid, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 2, proc.stderr
    assert lines[0].startswith("warning: could not write fid_stats/images.npz (File too large)"), lines  # the FID all the same
    assert lines[1] == "error: could not write stats.npz (File too large)", lines
    assert "FID " in proc.stdout and not (tmp_path / "stats.npz").exists() and not leftovers(tmp_path)
    assert not list((tmp_path / "fid_stats").iterdir())
