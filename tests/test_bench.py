import os
import re
import time

from conftest import REPO, assert_clean_failure, run_script

ROW = r"\| {what} \| {batch} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.e+-]+) \| - \| - \|"

def bench(tmp_path, steps):
    started = time.time()
    proc = run_script(
        "bench.py", os.path.join(REPO, "config", "train_debug.py"), "--input_shape=3,16,16", "--batch_size=32", "--n_embd=128",
        "--n_head=4", "--warmup_steps=2", f"--bench_steps={steps}", "--sample_steps=2", "--sample_batch_size=4", "--compile=False",
        "--sampler=dpm++2m", cwd=tmp_path, process=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, time.time() - started

def test_bench_on_cpu_with_a_train_config(tmp_path):
    """Its numbers against an independent clock and the model's own FLOP count: the timed steps fit in the process's
    wall time, 40 more steps cost the process about 40 x the reported step, and TFLOP/s is flops_per_image x images/s.
    The growth is a difference of two wall times, which another job on the machine (pytest -n 2) can blur: a bench
    that reports the wrong time fails every try, a right one passes one of three."""
    from model import DiT, DiTConfig

    for attempt in range(3):
        # a train config sets keys bench.py does not use (out_dir, ema_decay, ...): they are ignored
        short, short_wall = bench(tmp_path, 2)
        long, long_wall = bench(tmp_path, 42)
        assert "cpu, 0.7M parameters, 16 tokens per image (3x16x16, patch 4), float32, compile off" in long
        assert "| what | batch | ms | images/s | TFLOP/s | MFU | peak memory |" in long
        train = re.search(ROW.format(what="train step", batch=32), long)
        sample = re.search(ROW.format(what=r"dpm\+\+2m 2 steps, cfg 1.5", batch=4), long)
        assert train and sample, long
        ms, images_per_sec, tflops = (float(g) for g in train.groups())
        assert abs(32 / (ms / 1000) / images_per_sec - 1) < 0.01
        assert (2 + 42) * ms / 1000 + float(sample.group(1)) / 1000 < long_wall  # the timed work fits in the process
        growth = (long_wall - short_wall) / (40 * ms / 1000)  # and the process grows by the steps' time
        if 0.4 < growth < 2.5:
            break
    else:
        raise AssertionError(f"40 more steps of {ms} ms made the process {long_wall - short_wall:.2f} s longer (the last of 3 tries)")
    flops = DiT(DiTConfig(input_size=16, patch_size=4, n_layer=2, n_head=4, n_embd=128, num_classes=10)).flops_per_image()
    assert abs(tflops / (flops * images_per_sec / 1e12) - 1) < 0.01, (tflops, flops)

def test_bench_errors(tmp_path):
    proc = run_script("bench.py", "--dataset=unknown", cwd=tmp_path)
    assert_clean_failure(proc, "no data/unknown/meta.json", "--input_shape=C,H,W")
    proc = run_script("bench.py", "--input_shape=3,8,8", "--patch_size=3", cwd=tmp_path)
    assert_clean_failure(proc, "not divisible by patch_size 3")
    proc = run_script("bench.py", "--input_shape=3,8,8", "--sampler=heun", cwd=tmp_path)
    assert_clean_failure(proc, "unknown sampler 'heun'; choose one of ddim, dpm++2m")
