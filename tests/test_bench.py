import os
import re

from conftest import REPO, assert_clean_failure, run_script


def test_bench_on_cpu_with_a_train_config(tmp_path):
    # a train config sets keys bench.py does not use (out_dir, ema_decay, ...): they are ignored
    proc = run_script(
        "bench.py", os.path.join(REPO, "config", "train_debug.py"), "--input_shape=3,16,16", "--batch_size=8",
        "--warmup_steps=1", "--bench_steps=2", "--sample_steps=2", "--sample_batch_size=4", "--compile=False", "--sampler=dpm++2m",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpu, 0.2M parameters, 16 tokens per image (3x16x16, patch 4), float32, compile off" in proc.stdout
    assert "| what | batch | ms | images/s | TFLOP/s | MFU | peak memory |" in proc.stdout
    train = re.search(r"\| train step \| 8 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.e+-]+) \| - \| - \|", proc.stdout)
    sample = re.search(r"\| dpm\+\+2m 2 steps, cfg 1.5 \| 4 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.e+-]+) \| - \| - \|", proc.stdout)
    assert train and sample, proc.stdout
    ms, images_per_sec = float(train.group(1)), float(train.group(2))
    assert abs(8 / (ms / 1000) - images_per_sec) <= 0.05 + images_per_sec * 0.051 / ms  # both printed with 1 decimal


def test_bench_errors(tmp_path):
    proc = run_script("bench.py", "--dataset=unknown", cwd=tmp_path)
    assert_clean_failure(proc, "no data/unknown/meta.json", "--input_shape=C,H,W")
    proc = run_script("bench.py", "--input_shape=3,8,8", "--patch_size=3", cwd=tmp_path)
    assert_clean_failure(proc, "not divisible by patch_size 3")
