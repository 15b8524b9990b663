"""train.py's resume, preemption and divergence (apart from test_train.py so that pytest -n 2 --dist loadfile can give
the two files to two workers)."""
import os
import re
import signal
import time

import pytest
import torch

from conftest import assert_clean_failure, start, wait_for
from test_train import losses, mlflow_client, same_weights, the_only_run, train, weights

# One uninterrupted run is the reference for every way of getting to the same iteration.
# Muon (for the blocks' matrices) and AdamW (the rest): both optimizers' states must come back.
EXACT = ["--lr_decay_iters=100", "--warmup_iters=5", "--log_interval=10", "--eval_interval=50", "--dropout=0.1", "--dtype=bfloat16",
         "--optimizer=muon"]

@pytest.fixture(scope="module")
def straight(tiny_dataset, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    os.symlink(tiny_dataset, cwd / "data")
    proc = train(cwd, *EXACT, "--max_iters=100", "--out_dir=straight")
    assert proc.returncode == 0 and "cpu bfloat16" in proc.stdout, proc.stderr  # bf16 autocast on the CPU, bit-exact too
    return cwd / "straight" / "ckpt.pt", proc.stdout

def test_resume_is_exact(cwd, straight):
    first = train(cwd, *EXACT, "--max_iters=50", "--out_dir=halves", "--mlflow_log=True", "--mlflow_experiment=resume")
    assert first.returncode == 0, first.stderr
    run_id = torch.load(cwd / "halves" / "ckpt.pt", weights_only=True)["mlflow_run_id"]
    second = train(cwd, *EXACT, "--max_iters=100", "--out_dir=halves", "--init_from=resume", "--mlflow_log=True")
    assert second.returncode == 0, second.stderr
    assert "iter 60: loss" in second.stdout and "iter 10: loss" not in second.stdout
    assert same_weights(straight[0], cwd / "halves" / "ckpt.pt")  # bit-identical
    a, b = torch.load(straight[0], weights_only=True), torch.load(cwd / "halves" / "ckpt.pt", weights_only=True)
    assert [len(o["state"]) for o in a["optimizer"]] == [len(o["state"]) for o in b["optimizer"]] and len(a["optimizer"]) == 2
    for oa, ob in zip(a["optimizer"], b["optimizer"]):  # Muon's momentum, AdamW's two moments
        for pa, pb in zip(oa["state"].values(), ob["state"].values()):
            assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert losses(straight[1])[5:] == losses(second.stdout)  # the same log after the resume
    client = mlflow_client(f"sqlite:///{cwd}/mlflow.db")
    run = the_only_run(client, "resume")  # the resumed run continues, no second run
    assert run.info.run_id == run_id == b["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(10, 101, 10))

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_saves_and_resume_is_exact(cwd, straight, sig):
    """SIGTERM (how SLURM or Kubernetes stop a job) and Ctrl-C: the step finishes, ckpt.pt is saved with the real
    random state, the MLflow run is marked KILLED, the exit code names the signal, and resuming continues bit-exactly."""
    proc = start(cwd, *EXACT, "--max_iters=100000", "--out_dir=stopped", "--mlflow_log=True", "--mlflow_experiment=stop")
    output = wait_for(proc, "iter 20: loss")
    proc.send_signal(sig)
    output += proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + sig, output[-3000:]
    stopped_at = int(re.search(rf"stopped at iter (\d+) by {sig.name}; saved stopped/ckpt.pt, continue with --init_from=resume",
                               output).group(1))
    ckpt, _ = weights(cwd / "stopped" / "ckpt.pt")
    assert 20 <= stopped_at < 100 and ckpt["iter_num"] == stopped_at and len(ckpt["rng"]) == 1
    assert mlflow_client(f"sqlite:///{cwd}/mlflow.db").get_run(ckpt["mlflow_run_id"]).info.status == "KILLED"
    resumed = train(cwd, *EXACT, "--max_iters=100", "--out_dir=stopped", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(straight[0], cwd / "stopped" / "ckpt.pt")  # bit-identical

def test_a_second_ctrl_c_stops_at_once(cwd):
    """The first Ctrl-C asks for a stop after the step; a second, while the step (here a long sample grid) still
    runs, stops at once: no checkpoint of that iteration, no 'stopped' line."""
    proc = start(cwd, "--max_iters=40", "--out_dir=twice", "--sample_steps=2000", "--samples_per_class=8")
    wait_for(proc, "iter 20: val loss")  # the grid is being sampled now, for seconds
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode in (130, -signal.SIGINT), output[-2000:]
    assert "KeyboardInterrupt" in output and "stopped at iter" not in output
    assert not (cwd / "twice" / "ckpt.pt").exists()

def test_divergence_keeps_the_last_good_checkpoint(cwd):
    """The loss turns NaN between evaluations: nothing non-finite is saved, the message names the iteration and the
    checkpoint kept, and the exit status is 1. The same when a stop signal comes first."""
    assert train(cwd, "--max_iters=20").returncode == 0
    kept = {name: (cwd / "out-debug" / name).read_bytes() for name in ("ckpt.pt", "best.pt")}
    diverge = ["--init_from=resume", "--learning_rate=1e30", "--warmup_iters=0", "--max_iters=40", "--lr_decay_iters=40"]
    proc = train(cwd, *diverge, "--log_interval=7", "--eval_interval=5")
    assert_clean_failure(proc, "became non-finite by iter 25", "out-debug/ckpt.pt (iter 20) is the last good checkpoint",
                         "--learning_rate", "--compile=False")
    assert all((cwd / "out-debug" / name).read_bytes() == data for name, data in kept.items())
    proc = start(cwd, *diverge, "--max_iters=100000", "--log_interval=100000", "--eval_interval=100000", "--mlflow_log=True",
                 "--mlflow_experiment=nan")
    wait_for(proc, "parameters")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "is the last good checkpoint" in output and "stopped at iter" not in output, output[-2000:]
    assert all((cwd / "out-debug" / name).read_bytes() == data for name, data in kept.items())
    assert the_only_run(mlflow_client(f"sqlite:///{cwd}/mlflow.db"), "nan").info.status == "FAILED"
    proc = train(cwd, "--out_dir=fresh", "--learning_rate=1e30", "--grad_clip=0.0", "--warmup_iters=0", "--max_iters=40")
    assert_clean_failure(proc, "became non-finite by iter", "no checkpoint was written")
    assert not (cwd / "fresh" / "ckpt.pt").exists()

def test_resume_refuses_another_diffusion(cwd):
    assert train(cwd, "--max_iters=20", "--noise_schedule=cosine", "--prediction=v").returncode == 0
    ckpt = (cwd / "out-debug" / "ckpt.pt").read_bytes()
    proc = train(cwd, "--max_iters=40", "--init_from=resume", "--noise_schedule=flow", "--prediction=velocity", "--input_scale=0.5")
    assert_clean_failure(proc, "holds a different model", "noise_schedule='cosine' there, 'flow' here",
                         "prediction='v' there, 'velocity' here", "input_scale=1.0 there, 0.5 here", "another --out_dir")
    proc = train(cwd, "--max_iters=40", "--init_from=resume", "--schedule_tau=2.0", "--n_layer=3")
    assert_clean_failure(proc, "schedule_tau=1.0 there, 2.0 here", "n_layer=2 there, 3 here")
    proc = train(cwd, "--max_iters=40", "--init_from=resume", "--optimizer=muon")
    assert_clean_failure(proc, "holds a different model (optimizer='adamw' there, 'muon' here)", "resume with its settings")
    proc = train(cwd, "--max_iters=40", "--init_from=resume", "--schedule_start=0.0")  # the default, spelled out: the same
    assert proc.returncode == 0, proc.stderr
    assert (cwd / "out-debug" / "ckpt.pt").read_bytes() != ckpt
    # the optimisation may change; a longer run with the decay tied to max_iters says the learning rate jumps
    proc = train(cwd, "--max_iters=80", "--init_from=resume", "--learning_rate=2e-3", "--t_sampling=logit_normal", "--ema_decay=0.9")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"max_iters 40 -> 80 moves the end of the cosine decay: at iter 40 the learning rate jumps from "
                     r"1\.00e-04 to [0-9.e+-]+; pass --lr_decay_iters=40", proc.stderr), proc.stderr
    proc = train(cwd, "--max_iters=100", "--init_from=resume", "--lr_decay_iters=80")
    assert proc.returncode == 0 and "jumps" not in proc.stderr, proc.stderr
