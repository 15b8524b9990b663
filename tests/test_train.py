import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from conftest import REPO, TINY_TRAIN, assert_clean_failure, run_script

# A tiny run on the tiny dataset: 8x8 pixels, patch 2 -> 16 tokens
TINY = [os.path.join(REPO, "config", "train_debug.py"), "--data_dir=data", "--dataset=tiny", *TINY_TRAIN, "--eval_interval=20"]


def train(cwd, *args, env=None):
    return run_script("train.py", *TINY, *args, cwd=cwd, env=env)


def losses(stdout):
    return [float(m) for m in re.findall(r"^iter \d+: loss ([0-9.]+)", stdout, re.M)]


def mlflow_client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def the_only_run(client, experiment):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_train_end_to_end_with_mlflow(tiny_dataset, tmp_path):
    os.symlink(tiny_dataset, tmp_path / "data")
    proc = train(tmp_path, "--max_iters=200", "--log_interval=20", "--eval_interval=100", "--mlflow_log=True", "--mlflow_experiment=e2e")
    assert proc.returncode == 0, proc.stderr
    log = losses(proc.stdout)
    assert len(log) == 10 and log[-1] < 0.6 * log[0], log  # the loss falls
    assert re.search(r"iter 200: val loss [0-9.]+, EMA val loss [0-9.]+", proc.stdout)
    out = tmp_path / "out-debug"
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "samples_000100.png", "samples_000200.png"]
    from PIL import Image

    grid = Image.open(out / "samples_000200.png")
    assert grid.size[1] == 3 * 10 + 2 and grid.size[0] > 2 * 10 + 2  # 3 classes x 2 columns of 8x8, 2-pixel padding, names

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 200 and ckpt["meta"]["classes"] == ["cat", "dog", "frog"]
    assert ckpt["config"]["max_iters"] == 200 and ckpt["model_config"]["n_layer"] == 2
    assert set(ckpt) >= {"model", "ema", "optimizer", "rng", "best_val_loss", "mlflow_run_id"}

    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")  # MLflow's default store, in the cwd
    run = the_only_run(client, "e2e")
    assert run.info.run_id == ckpt["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["n_layer"] == "2" and run.data.params["dataset"] == "tiny"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(20, 201, 20))
    assert abs(history[-1].value - log[-1]) < 1e-4
    assert {"val/loss", "val/ema_loss", "lr", "images_per_sec"} <= set(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert len(images) >= 2 and any("samples" in p for p in images), images


def test_resume_is_exact(tiny_dataset, tmp_path):
    os.symlink(tiny_dataset, tmp_path / "data")
    common = ["--lr_decay_iters=40", "--warmup_iters=5", "--mlflow_log=True", "--mlflow_experiment=resume", "--dropout=0.1"]
    straight = train(tmp_path, *common, "--max_iters=40", "--out_dir=straight", "--mlflow_log=False")
    assert straight.returncode == 0, straight.stderr
    first = train(tmp_path, *common, "--max_iters=20", "--out_dir=halves")
    assert first.returncode == 0, first.stderr
    run_id = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)["mlflow_run_id"]
    second = train(tmp_path, *common, "--max_iters=40", "--out_dir=halves", "--init_from=resume")
    assert second.returncode == 0, second.stderr
    assert "iter 30: loss" in second.stdout and "iter 10: loss" not in second.stdout

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 40
    for key in ["model", "ema"]:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)  # bit-identical
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert losses(straight.stdout)[2:] == losses(second.stdout)  # the same log after the resume

    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    run = the_only_run(client, "resume")  # the resumed run continues, no second run
    assert run.info.run_id == run_id == b["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [10, 20, 30, 40]


def test_ddp_with_torchrun(tiny_dataset, tmp_path):
    os.symlink(tiny_dataset, tmp_path / "data")
    proc = start(tmp_path, "--max_iters=40", "--mlflow_log=True", "--mlflow_experiment=ddp", "--out_dir=out-debug",
                 torchrun=["--standalone", "--nproc_per_node=2"])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "batch 16 = 2 processes x 1 steps x 8" in output
    assert "weights identical on all 2 processes: True" in output
    assert output.count("iter 40: loss") == 1  # only rank 0 logs
    ckpt = torch.load(tmp_path / "out-debug" / "ckpt.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])
    the_only_run(mlflow_client(f"sqlite:///{tmp_path}/mlflow.db"), "ddp")  # only rank 0 logs to MLflow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_over_http_and_a_dead_server(tiny_dataset, tmp_path):
    os.symlink(tiny_dataset, tmp_path / "data")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        proc = train(tmp_path, "--max_iters=20", f"--mlflow_tracking_uri={uri}", "--mlflow_log=True", "--mlflow_experiment=http")
        assert proc.returncode == 0, proc.stderr
        client = mlflow_client(uri)
        run = the_only_run(client, "http")
        assert run.data.params["max_iters"] == "20" and "val/ema_loss" in run.data.metrics
        assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store
    finally:
        server.terminate()
        server.wait(timeout=30)

    # A tracking server that is not there: one warning, and training goes on
    started = time.time()
    proc = train(tmp_path, "--max_iters=20", f"--mlflow_tracking_uri=http://127.0.0.1:{free_port()}", "--mlflow_log=True", "--out_dir=dead")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("MLflow logging is off") == 1
    assert (tmp_path / "dead" / "ckpt.pt").exists() and "iter 20: val loss" in proc.stdout
    assert time.time() - started < 60


def test_compile_on_cpu(tiny_dataset, tmp_path):
    os.symlink(tiny_dataset, tmp_path / "data")
    proc = train(tmp_path, "--compile=True", "--max_iters=4", "--log_interval=2", "--eval_interval=4", "--mlflow_log=False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout and "iter 4: val loss" in proc.stdout
    assert (tmp_path / "out-debug" / "ckpt.pt").exists()


def test_bad_input(tiny_dataset, tmp_path):
    os.symlink(tiny_dataset, tmp_path / "data")
    proc = train(tmp_path, "--dataset=nothing")
    assert_clean_failure(proc, os.path.join("data", "nothing", "meta.json"), "prepare_cifar.py")
    proc = train(tmp_path, "--patch_size=3")
    assert_clean_failure(proc, "not divisible by patch_size 3", "3x8x8")
    proc = train(tmp_path, "--batch_size=10", "--gradient_accumulation_steps=3")
    assert_clean_failure(proc, "batch_size 10 is not divisible by 1 processes x 3 accumulation steps")
    proc = train(tmp_path, "--init_from=resume")
    assert_clean_failure(proc, "no out-debug/ckpt.pt", "train from scratch first")
    proc = train(tmp_path, "--init_form=resume")
    assert_clean_failure(proc, "unknown config key 'init_form'", "init_from")
    proc = train(tmp_path, "--prediction=velocity")
    assert_clean_failure(proc, "'velocity' is the rectified-flow target", "noise_schedule='flow'")
    proc = train(tmp_path, "--noise_schedule=flow", "--prediction=eps")
    assert_clean_failure(proc, "'eps' cannot work with noise_schedule='flow'", "prediction='velocity'")
    proc = train(tmp_path, "--sampler=euler")
    assert_clean_failure(proc, "unknown sampler 'euler'", "ddim, dpm++2m")
    assert not (tmp_path / "out-debug").exists()  # nothing written by any of these

    assert train(tmp_path, "--max_iters=20").returncode == 0
    ckpt = (tmp_path / "out-debug" / "ckpt.pt").read_bytes()
    proc = train(tmp_path, "--max_iters=40")
    assert_clean_failure(proc, "out-debug/ckpt.pt already exists", "--init_from=resume")
    proc = train(tmp_path, "--max_iters=40", "--init_from=resume", "--n_layer=3", "--n_embd=32")
    assert_clean_failure(proc, "holds a different model", "n_layer=2 there, 3 here", "n_embd=64 there, 32 here")
    proc = train(tmp_path, "--out_dir=nan", "--learning_rate=1e30", "--grad_clip=0.0", "--max_iters=40")
    assert_clean_failure(proc, "loss is nan at iter", "last good checkpoint", "--learning_rate")
    assert not (tmp_path / "nan" / "ckpt.pt").exists()
    assert (tmp_path / "out-debug" / "ckpt.pt").read_bytes() == ckpt  # nothing overwritten

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint")
    proc = train(tmp_path, "--out_dir=junk", "--init_from=resume")
    assert_clean_failure(proc, "junk/ckpt.pt is not a nano-diffusion checkpoint")
    assert (tmp_path / "junk" / "ckpt.pt").read_bytes() == b"not a checkpoint"


def test_flow_matching_end_to_end(tiny_dataset, tmp_path):
    """The rectified-flow objective through the real scripts: train, then sample with both samplers."""
    os.symlink(tiny_dataset, tmp_path / "data")
    proc = train(tmp_path, "--noise_schedule=flow", "--prediction=velocity", "--t_sampling=logit_normal",
                 "--max_iters=40", "--sampler=dpm++2m", "--sample_steps=5", "--out_dir=flow")
    assert proc.returncode == 0, proc.stderr
    log = losses(proc.stdout)
    assert log[-1] < log[0], log
    ckpt = torch.load(tmp_path / "flow" / "ckpt.pt", weights_only=True)
    assert ckpt["noise_schedule"]["name"] == "flow" and ckpt["model_config"]["prediction"] == "velocity"
    assert (tmp_path / "flow" / "samples_000040.png").exists()
    for sampler in ["ddim", "dpm++2m"]:
        proc = run_script("sample.py", "--ckpt=flow/ckpt.pt", f"--sampler={sampler}", "--steps=4", "--num_per_class=2",
                          "--trajectory=True", f"--out_dir={sampler}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"{sampler} 4 steps" in proc.stdout and (tmp_path / sampler / "trajectory.png").exists()


# --- preemption and several machines ------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def start(cwd, *args, torchrun=()):
    """train.py (under torchrun with its arguments) as a running process whose output
    (stderr merged in) can be read as it comes. One thread per process under torchrun; a
    single process gets the two of run_script, so that its arithmetic is the same."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if torchrun else "2")
    return subprocess.Popen([*(TORCHRUN + list(torchrun) if torchrun else [sys.executable]), os.path.join(REPO, "train.py"),
                             *TINY, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, text):
    """The output lines up to and including the first that holds text."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"{text!r} never came:\n" + "".join(lines)[-3000:])


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {f"{key}.{name}": t for key in ("model", "ema") for name, t in ckpt[key].items()}


def test_sigterm_saves_and_resume_is_exact(tiny_dataset, tmp_path):
    """SIGTERM (how SLURM or Kubernetes stop a job): the step finishes, ckpt.pt is saved with
    the real random state, the exit code says SIGTERM, and resuming continues bit-exactly."""
    os.symlink(tiny_dataset, tmp_path / "data")
    common = ["--lr_decay_iters=400", "--warmup_iters=5", "--log_interval=5", "--eval_interval=1000", "--dropout=0.1"]
    proc = start(tmp_path, *common, "--max_iters=100000", "--out_dir=stopped")
    output = wait_for(proc, "iter 20: loss")
    proc.send_signal(signal.SIGTERM)
    output += proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = int(re.search(r"stopped at iter (\d+) by SIGTERM; saved stopped/ckpt.pt, continue with --init_from=resume",
                               output).group(1))
    ckpt, _ = weights(tmp_path / "stopped" / "ckpt.pt")
    assert stopped_at >= 20 and ckpt["iter_num"] == stopped_at and len(ckpt["rng"]) == 1
    resumed = train(tmp_path, *common, f"--max_iters={stopped_at + 10}", "--out_dir=stopped", "--init_from=resume")
    straight = train(tmp_path, *common, f"--max_iters={stopped_at + 10}", "--out_dir=straight")
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr + straight.stderr
    (a, wa), (b, wb) = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "stopped" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == stopped_at + 10
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical


def test_sigterm_under_torchrun_every_rank_saves(tiny_dataset, tmp_path):
    """torchrun passes SIGTERM to every rank; they agree at the next log step, save one
    checkpoint with both ranks' random states, and the resumed run ends in step."""
    os.symlink(tiny_dataset, tmp_path / "data")
    launcher = ["--standalone", "--nproc_per_node=2"]
    proc = start(tmp_path, "--max_iters=100000", "--log_interval=5", "--eval_interval=1000", "--out_dir=ddp", torchrun=launcher)
    output = wait_for(proc, "iter 10: loss")
    proc.send_signal(signal.SIGTERM)
    output += proc.communicate(timeout=300)[0]
    match = re.search(r"stopped at iter (\d+) by SIGTERM", output)
    assert match and output.count("stopped at iter") == 1, output[-3000:]  # rank 0 speaks for both
    ckpt, _ = weights(tmp_path / "ddp" / "ckpt.pt")
    assert ckpt["iter_num"] == int(match.group(1)) and ckpt["iter_num"] % 5 == 0  # agreed at a log step
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])
    proc = start(tmp_path, f"--max_iters={ckpt['iter_num'] + 10}", "--out_dir=ddp", "--init_from=resume", torchrun=launcher)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "weights identical on all 2 processes: True" in output, output[-3000:]


def test_two_nodes_on_one_machine(tiny_dataset, tmp_path):
    """Two torchrun launches, as on two machines, meeting at a c10d rendezvous on 127.0.0.1."""
    os.symlink(tiny_dataset, tmp_path / "data")
    endpoint = f"--rdzv_endpoint=127.0.0.1:{free_port()}"
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", endpoint, "--rdzv_id=nano"]
    nodes = [start(tmp_path, "--max_iters=20", "--out_dir=two", torchrun=launcher) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    output = "".join(outputs)
    assert "batch 16 = 2 processes x 1 steps x 8" in output
    assert output.count("weights identical on all 2 processes: True") == 1  # printed by global rank 0 only
    assert (tmp_path / "two" / "ckpt.pt").exists()
