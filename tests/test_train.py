import math
import os
import re
import subprocess
import sys
import time
import urllib.request

import torch

from conftest import REPO, TINY, assert_clean_failure, free_port, run_script

def train(cwd, *args):
    return run_script("train.py", *TINY, *args, cwd=cwd)

def losses(stdout):
    return [float(m) for m in re.findall(r"^iter \d+: loss ([0-9.]+)", stdout, re.M)]

def mlflow_client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)

def the_only_run(client, experiment):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]

def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {f"{key}.{name}": t for key in ("model", "ema") for name, t in ckpt[key].items()}

def same_weights(a, b, exact=True):
    (_, wa), (_, wb) = weights(a), weights(b)
    close = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    return wa.keys() == wb.keys() and all(close(wa[k], wb[k]) for k in wa)

def test_train_end_to_end_with_mlflow(tiny_run):
    cwd, proc = tiny_run
    log = losses(proc.stdout)
    assert len(log) == 10 and log[-1] < 0.6 * log[0], log  # the loss falls
    assert re.search(r"iter 300: val loss [0-9.]+, EMA val loss [0-9.]+", proc.stdout)
    out = cwd / "out"
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "samples_000150.png", "samples_000300.png"]
    from PIL import Image

    grid = Image.open(out / "samples_000300.png")
    assert grid.size[1] == 3 * 10 + 2 and grid.size[0] > 2 * 10 + 2  # 3 classes x 2 columns of 8x8, 2-pixel padding, names
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 300 and ckpt["meta"]["classes"] == ["cat", "dog", "frog"]
    assert ckpt["config"]["max_iters"] == 300 and ckpt["model_config"]["n_layer"] == 2
    assert set(ckpt) >= {"model", "ema", "optimizer", "rng", "best_val_loss", "mlflow_run_id"}

    client = mlflow_client(f"sqlite:///{cwd}/mlflow.db")  # MLflow's default store, in the cwd
    assert f"(see it with: mlflow ui --backend-store-uri sqlite:///{os.path.realpath(cwd)}/mlflow.db)" in proc.stdout  # anywhere
    run = the_only_run(client, "e2e")
    assert run.info.run_id == ckpt["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["n_layer"] == "2" and run.data.params["dataset"] == "tiny"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(30, 301, 30))
    assert abs(history[-1].value - log[-1]) < 1e-4
    assert {"val/loss", "val/ema_loss", "lr", "images_per_sec"} <= set(run.data.metrics)
    assert "mfu" not in run.data.metrics  # no peak known for a CPU
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert len(images) >= 2 and any("samples" in p for p in images), images

def test_patience_and_a_constant_learning_rate(cwd):
    proc = train(cwd, "--max_iters=100", "--lr_decay=constant", "--learning_rate=0.0", "--eval_interval=10", "--patience=2",
                 "--log_interval=10")
    assert proc.returncode == 0, proc.stderr
    assert "early stop: EMA val loss did not improve for 2 evals" in proc.stdout and "iter 30: val loss" in proc.stdout
    assert "iter 40" not in proc.stdout  # the weights never change: evals 20 and 30 do not improve on 10
    proc = train(cwd, "--max_iters=40", "--lr_decay=constant", "--learning_rate=2e-3", "--warmup_iters=10", "--out_dir=constant")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"lr ([0-9.e+-]+)", proc.stdout)[1:] == ["2.00e-03"] * 3  # after the warmup, constant
    assert torch.load(cwd / "out-debug" / "best.pt", weights_only=True)["iter_num"] == 10  # later evals never improved

def test_learning_rate_warms_up_then_follows_the_cosine(cwd):
    """The learning rate of every iteration, as logged, against the closed form: linear warm-up from 0 over
    warmup_iters, then a half cosine from learning_rate down to min_lr at lr_decay_iters, then min_lr."""
    proc = train(cwd, "--max_iters=30", "--warmup_iters=8", "--lr_decay_iters=24", "--learning_rate=1e-2", "--min_lr=1e-3",
                 "--log_interval=1", "--eval_interval=30", "--out_dir=lr")
    assert proc.returncode == 0, proc.stderr
    logged = [float(lr) for lr in re.findall(r"^iter \d+: loss [0-9.]+, lr ([0-9.e+-]+)", proc.stdout, re.M)]

    def expected(it):  # iteration it (0-based) is logged as iter it + 1
        if it < 8:
            return 1e-2 * (it + 1) / 9
        progress = min(1.0, (it - 8) / (24 - 8))
        return 1e-3 + 0.5 * (1 + math.cos(math.pi * progress)) * (1e-2 - 1e-3)

    assert len(logged) == 30, proc.stdout
    for it, lr in enumerate(logged):
        assert abs(lr - expected(it)) <= 0.006 * expected(it), (it, lr, expected(it))  # printed to 3 digits

def test_ema_follows_its_closed_form(cwd):
    """After iteration n the EMA is d_n * EMA + (1 - d_n) * weights, d_n = min(ema_decay, (1 + n) / (10 + n)): three
    checkpoints one iteration apart (each run resumes the last exactly) give the weights and the EMA at each. With
    ema_decay 0.2, iteration 1 decays by the warm-up term 2/11 and iteration 2 by ema_decay itself."""
    ckpts = []
    for n in (1, 2, 3):
        proc = train(cwd, f"--max_iters={n}", "--eval_interval=1", "--ema_decay=0.2", "--lr_decay=constant", "--warmup_iters=0",
                     "--out_dir=ema", *(["--init_from=resume"] if n > 1 else []))
        assert proc.returncode == 0, proc.stderr
        ckpts.append(torch.load(cwd / "ema" / "ckpt.pt", weights_only=True))
    for n, decay in [(1, 2 / 11), (2, 0.2)]:
        before, after = ckpts[n - 1], ckpts[n]
        moved = 0.0
        for name, ema in after["ema"].items():
            closed_form = decay * before["ema"][name].double() + (1 - decay) * after["model"][name].double()
            assert torch.allclose(ema.double(), closed_form, rtol=1e-5, atol=1e-7), (n, name)
            moved = max(moved, (after["model"][name] - before["ema"][name]).abs().max().item())
        assert moved > 1e-4  # the weights moved away from the EMA, so the decay's weight is seen

def test_the_guide_is_the_ema_of_guide_iter(cwd):
    """Autoguidance's guide is the EMA as it was at guide_iter, kept in every later checkpoint: a run that stops there
    ends with that EMA. The same with a resume in between, and without guide_iter no guide."""
    common = ["--eval_interval=2", "--lr_decay=constant", "--warmup_iters=0"]
    assert train(cwd, "--max_iters=2", "--out_dir=short", *common).returncode == 0
    proc = train(cwd, "--max_iters=4", "--guide_iter=2", "--out_dir=long", *common)
    assert proc.returncode == 0, proc.stderr
    short, long = (torch.load(cwd / out / "ckpt.pt", weights_only=True) for out in ("short", "long"))
    assert short["guide"] is None and long["iter_num"] == 4
    assert all(torch.equal(long["guide"][k], short["ema"][k]) for k in short["ema"])
    assert not all(torch.equal(long["guide"][k], long["ema"][k]) for k in long["ema"])
    proc = train(cwd, "--max_iters=6", "--guide_iter=2", "--out_dir=long", "--init_from=resume", *common)
    assert proc.returncode == 0, proc.stderr
    resumed = torch.load(cwd / "long" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(resumed["guide"][k], short["ema"][k]) for k in short["ema"])
    proc = train(cwd, "--max_iters=2", "--guide_iter=2", "--out_dir=bad")
    assert proc.returncode == 1 and "guide_iter 2 must be below max_iters 2" in proc.stderr

def test_the_optimizer_sees_the_clipped_gradient(cwd):
    """grad_clip: the gradient every optimizer step sees (a global step hook of torch.optim) has norm grad_clip, the
    raw gradients of this model being far larger; grad_clip=0 leaves them as they are."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: norms.append(torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for group in optimizer.param_groups for p in group["params"] if p.grad is not None])).item()))
    try:
        clipped = train(cwd, "--max_iters=10", "--eval_interval=10", "--grad_clip=0.01", "--out_dir=clipped")
        clipped_norms, norms[:] = norms[:], []
        raw = train(cwd, "--max_iters=10", "--eval_interval=10", "--grad_clip=0.0", "--out_dir=raw")
    finally:
        hook.remove()
    assert clipped.returncode == 0 and raw.returncode == 0, clipped.stderr + raw.stderr
    assert len(clipped_norms) == 10 and all(abs(n - 0.01) < 1e-6 for n in clipped_norms), clipped_norms
    assert len(norms) == 10 and min(norms) > 0.1, norms  # unclipped: the real norms, all far above 0.01

def test_compile_matches_eager():
    """One training step's output and gradients, compiled and eager, in bf16 autocast on the CPU, at 64 tokens (on an
    AVX-512 Xeon, Inductor's horizontal fusion once made every gradient NaN at this size; runtime.compile_model)."""
    from conftest import tiny_config
    from runtime import compile_model
    from model import DiT

    model = DiT(tiny_config(input_size=16, n_embd=64, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)  # open the zero-initialised gates
    x, t, y = torch.randn(8, 3, 16, 16), torch.rand(8), torch.randint(0, 3, (8,))
    results = []
    for net in (model, compile_model(model, "cpu")):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, y).float()
        out.square().mean().backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert torch.allclose(eager, compiled, atol=3e-2, rtol=3e-2)  # bf16 rounding in other places
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.isfinite(b).all() and torch.allclose(a, b, atol=1e-2, rtol=0.1)

def test_a_gpu_config_on_a_cpu(cwd):
    proc = run_script("train.py", os.path.join(REPO, "config", "train_cifar.py"), "--dataset=tiny", "--mlflow_log=False", cwd=cwd)
    assert_clean_failure(proc, "train_cifar.py is sized for a GPU", "days on this CPU", "config/train_cifar_cpu.py",
                         "--device=cpu")
    assert not (cwd / "out-cifar").exists()
    # --device=cpu: trained here all the same (a smaller model of the config: the check only runs without --device)
    proc = run_script("train.py", os.path.join(REPO, "config", "train_cifar.py"), "--dataset=tiny", "--device=cpu", "--compile=False",
                      "--batch_size=2", "--max_iters=1", "--eval_iters=1", "--samples_per_class=1", "--sample_steps=1",
                      "--n_layer=2", "--n_embd=48", "--mlflow_log=False", cwd=cwd)
    assert proc.returncode == 0 and "sized for a GPU" not in proc.stderr and "iter 1: val loss" in proc.stdout, proc.stderr

def test_bad_input(cwd):
    for args, fragments in [
        (["--dataset=nothing"], [os.path.join("data", "nothing", "meta.json"), "prepare_cifar.py"]),
        (["--patch_size=3"], ["not divisible by patch_size 3", "3x8x8"]),
        (["--batch_size=10", "--gradient_accumulation_steps=3"], ["batch_size 10 is not divisible by 1 processes x 3 accumulation"]),
        (["--init_from=resume"], ["no checkpoint out-debug/ckpt.pt", "--init_from=resume needs one", "train from scratch first"]),
        (["--init_from=continue"], ["init_from must be 'scratch' or 'resume', got 'continue'"]),
        (["--dtype=float16"], ["dtype must be 'bfloat16' or 'float32', got 'float16'"]),
        (["--lr_decay=linear"], ["lr_decay must be 'cosine' or 'constant', got 'linear'"]),
        (["--fid_interval=30"], ["fid_interval 30 is not a multiple of eval_interval 20"]),
        (["--init_form=resume"], ["unknown config key 'init_form'", "init_from"]),
        (["--prediction=velocity"], ["'velocity' is the rectified-flow target", "noise_schedule='flow'"]),
        (["--noise_schedule=flow", "--prediction=eps"], ["'eps' cannot work with noise_schedule='flow'", "prediction='velocity'"]),
        (["--sampler=euler"], ["unknown sampler 'euler'", "ddim, dpm++2m"]),
    ]:
        assert_clean_failure(train(cwd, *args), *fragments)
    assert not (cwd / "out-debug").exists()  # nothing written by any of these

    assert train(cwd, "--max_iters=20").returncode == 0
    ckpt = (cwd / "out-debug" / "ckpt.pt").read_bytes()
    assert_clean_failure(train(cwd, "--max_iters=40"), "out-debug/ckpt.pt already exists", "--init_from=resume")
    assert (cwd / "out-debug" / "ckpt.pt").read_bytes() == ckpt  # nothing overwritten
    (cwd / "junk").mkdir()
    (cwd / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert_clean_failure(train(cwd, "--out_dir=junk", "--init_from=resume"), "junk/ckpt.pt is not a nano-diffusion checkpoint")
    assert (cwd / "junk" / "ckpt.pt").read_bytes() == b"not a checkpoint"

def test_flow_matching_end_to_end(cwd):
    """The rectified-flow objective through the real scripts: train, then sample with both samplers."""
    proc = train(cwd, "--noise_schedule=flow", "--prediction=velocity", "--t_sampling=logit_normal", "--max_iters=40",
                 "--sampler=dpm++2m", "--sample_steps=5", "--out_dir=flow")
    assert proc.returncode == 0, proc.stderr
    log = losses(proc.stdout)
    assert log[-1] < log[0], log
    ckpt = torch.load(cwd / "flow" / "ckpt.pt", weights_only=True)
    assert ckpt["noise_schedule"]["name"] == "flow" and ckpt["model_config"]["prediction"] == "velocity"
    assert (cwd / "flow" / "samples_000040.png").exists()
    for sampler in ["ddim", "dpm++2m"]:
        proc = run_script("sample.py", "--ckpt=flow/ckpt.pt", f"--sampler={sampler}", "--steps=4", "--num_per_class=2",
                          "--trajectory=True", f"--out_dir={sampler}", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert f"{sampler} 4 steps" in proc.stdout and (cwd / sampler / "trajectory.png").exists()

def test_every_config_parses_and_builds_its_model(tmp_path):
    """Each training config, read by bench.py (which ignores keys only train.py uses), builds its model and takes a step."""
    for name in sorted(os.listdir(os.path.join(REPO, "config"))):
        if name.startswith("train_"):
            proc = run_script("bench.py", os.path.join(REPO, "config", name), "--batch_size=1", "--warmup_steps=0", "--bench_steps=1",
                              "--bench_sampling=False", "--compile=False", "--device=cpu", "--dtype=float32", cwd=tmp_path)
            assert proc.returncode == 0 and "| train step | 1 |" in proc.stdout, (name, proc.stderr[-2000:])
    proc = run_script("sample.py", os.path.join(REPO, "config", "sample_grid.py"), "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--classes='airplane,automobile" in proc.stdout, proc.stderr

def test_mlflow_server_over_http_and_a_dead_server(cwd):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{cwd}/server.db", "--artifacts-destination", str(cwd / "artifacts"), "--workers", "1"],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        # While the server starts: a tracking server that is not there gives one warning, and training goes on
        started = time.time()
        proc = train(cwd, "--max_iters=20", f"--mlflow_tracking_uri=http://127.0.0.1:{free_port()}", "--mlflow_log=True",
                     "--out_dir=dead")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("MLflow logging is off") == 1
        assert (cwd / "dead" / "ckpt.pt").exists() and "iter 20: val loss" in proc.stdout
        assert time.time() - started < 60

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        proc = train(cwd, "--max_iters=20", f"--mlflow_tracking_uri={uri}", "--mlflow_log=True", "--mlflow_experiment=http")
        assert proc.returncode == 0, proc.stderr
        client = mlflow_client(uri)
        run = the_only_run(client, "http")
        assert run.data.params["max_iters"] == "20" and "val/ema_loss" in run.data.metrics
        assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))
        assert not (cwd / "mlflow.db").exists()  # nothing went to the local default store
    finally:
        server.terminate()
        server.wait(timeout=30)
