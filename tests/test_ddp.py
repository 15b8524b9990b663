import os
import re
import signal

import pytest
import torch

from conftest import free_port, run_script, start, wait_for
from test_train import mlflow_client, same_weights, the_only_run, train, weights

# --- several processes: DDP with torchrun and gloo -------------------------------------------
# P processes x A micro-steps train as 1 process x P*A micro-steps (train.py's random streams): a single-process run
# with gradient accumulation is the reference for every torchrun run, to float tolerance.
SPLIT = ["--lr_decay_iters=60", "--warmup_iters=5", "--log_interval=10", "--eval_interval=20"]

def reference(tiny_dataset, tmp_path_factory, steps):
    cwd = tmp_path_factory.mktemp(f"accumulated{steps}")
    os.symlink(tiny_dataset, cwd / "data")
    proc = train(cwd, *SPLIT, "--max_iters=60", f"--gradient_accumulation_steps={steps}", "--out_dir=reference")
    assert proc.returncode == 0 and f"batch 16 = 1 processes x {steps} steps x {16 // steps}" in proc.stdout, proc.stderr
    return cwd / "reference" / "ckpt.pt"

@pytest.fixture(scope="module")
def accumulated(tiny_dataset, tmp_path_factory):
    """1 process x 2 micro-steps: the reference of 2 processes x 1."""
    return reference(tiny_dataset, tmp_path_factory, 2)

@pytest.fixture(scope="module")
def accumulated4(tiny_dataset, tmp_path_factory):
    """1 process x 4 micro-steps: the reference of 2 processes x 2, where DDP must average on the last micro-step."""
    return reference(tiny_dataset, tmp_path_factory, 4)

def test_ddp_with_torchrun(cwd, accumulated, random_inception_weights):
    """Two processes: identical weights, one log and one MLflow run, MFU per device, FID sampled by both and equal to
    fid.py's score of the same checkpoint; resumed as one process with 2 micro-steps, it ends on the reference."""
    proc = start(cwd, *SPLIT, "--max_iters=40", "--mlflow_log=True", "--mlflow_experiment=ddp", "--out_dir=ddp", "--peak_flops=1e9",
                 "--fid_interval=40", "--fid_num_samples=10", f"--inception_weights={random_inception_weights}",
                 torchrun=["--standalone", "--nproc_per_node=2"])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "batch 16 = 2 processes x 1 steps x 8" in output and "weights identical on all 2 processes" in output
    assert output.count("iter 40: loss") == 1  # only rank 0 logs
    from model import DiT, DiTConfig

    ckpt = torch.load(cwd / "ddp" / "ckpt.pt", weights_only=True)
    flops = DiT(DiTConfig(**ckpt["model_config"])).flops_per_image(training=True)
    for images_per_sec, mfu in re.findall(r"ms/iter, (\d+) img/s, MFU ([0-9.]+)%", output):
        assert abs(float(mfu) / 100 - int(images_per_sec) * flops / (2 * 1e9)) < 0.01 * float(mfu) / 100 + 2e-3
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["streams"][0], ckpt["rng"][1]["streams"][0])
    run = the_only_run(mlflow_client(f"sqlite:///{cwd}/mlflow.db"), "ddp")  # only rank 0 logs to MLflow
    score = float(re.search(r"iter 40: fid_10 ([0-9.]+)", output).group(1))
    assert abs(run.data.metrics["fid_10"] - score) < 1e-3 and "mfu" in run.data.metrics
    # the same checkpoint scored by fid.py with train.py's settings gives the same number
    proc = run_script("fid.py", "--ckpt=ddp/ckpt.pt", "--num_samples=10", "--steps=4", "--seed=1337", "--ref=data/tiny",
                      f"--inception_weights={random_inception_weights}", "--mlflow_log=False", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert abs(float(re.search(r"^FID ([0-9.]+)", proc.stdout, re.M).group(1)) - score) < 2e-3, proc.stdout
    # another number of processes: 1 process x 2 micro-steps draws the same batches, and ends on the reference
    proc = train(cwd, *SPLIT, "--max_iters=60", "--gradient_accumulation_steps=2", "--out_dir=ddp", "--init_from=resume")
    assert proc.returncode == 0 and "random streams" not in proc.stdout, proc.stderr
    assert same_weights(accumulated, cwd / "ddp" / "ckpt.pt", exact=False)

def test_sigterm_under_torchrun_then_divergence(cwd, accumulated4):
    """2 processes x 2 micro-steps. torchrun passes SIGTERM to every rank; they agree at the next log step and save one
    checkpoint with both ranks' random streams; the resumed run ends with identical weights on both, and on the
    reference of 1 process x 4 micro-steps. Then a learning rate that makes the weights NaN: both ranks stop together
    with one error line and keep the checkpoint."""
    launcher = ["--standalone", "--nproc_per_node=2"]
    split = [*SPLIT, "--gradient_accumulation_steps=2"]
    proc = start(cwd, *split, "--max_iters=100000", "--log_interval=5", "--out_dir=ddp", torchrun=launcher)
    output = wait_for(proc, "iter 10: loss")
    proc.send_signal(signal.SIGTERM)
    output += proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-3000:]  # torchrun says its workers were stopped by a signal
    match = re.search(r"stopped at iter (\d+) by SIGTERM", output)
    assert match and output.count("stopped at iter") == 1, output[-3000:]  # rank 0 speaks for both
    ckpt, _ = weights(cwd / "ddp" / "ckpt.pt")
    assert ckpt["iter_num"] == int(match.group(1)) < 60 and ckpt["iter_num"] % 5 == 0  # agreed at a log step
    assert len(ckpt["rng"]) == 2
    proc = start(cwd, *split, "--max_iters=60", "--out_dir=ddp", "--init_from=resume", torchrun=launcher)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "weights identical on all 2 processes" in output, output[-3000:]
    assert same_weights(accumulated4, cwd / "ddp" / "ckpt.pt", exact=False)
    kept = (cwd / "ddp" / "ckpt.pt").read_bytes()
    proc = start(cwd, *split, "--max_iters=100", "--out_dir=ddp", "--init_from=resume", "--learning_rate=1e30", "--lr_decay=constant",
                 torchrun=launcher)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and output.count("error: the loss or the weights became non-finite by iter 70") == 1, output[-3000:]
    assert (cwd / "ddp" / "ckpt.pt").read_bytes() == kept

def test_two_nodes_on_one_machine(cwd):
    """Two torchrun launches, as on two machines, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"--rdzv_endpoint=127.0.0.1:{free_port()}"
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", endpoint, "--rdzv_id=nano"]
    nodes = [start(cwd, "--max_iters=20", "--out_dir=two", torchrun=launcher) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    output = "".join(outputs)
    assert "batch 16 = 2 processes x 1 steps x 8" in output
    assert output.count("weights identical on all 2 processes") == 1  # printed by global rank 0 only
    assert (cwd / "two" / "ckpt.pt").exists()


def test_weights_that_differ_between_processes_are_an_error(cwd, tmp_path):
    """Should DDP ever leave the processes with different weights, the run ends with one error line that names them,
    and a non-zero exit. Provoked here by a step hook that nudges rank 1's weights after every optimizer step."""
    (tmp_path / "nudge").mkdir()
    (tmp_path / "nudge" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch\n"
        "    from torch.optim.optimizer import register_optimizer_step_post_hook\n"
        "    def nudge(optimizer, args, kwargs):\n"
        "        with torch.no_grad():\n"
        "            optimizer.param_groups[0]['params'][0].add_(1e-3)  # DiT.out_modulation\n"
        "    register_optimizer_step_post_hook(nudge)\n")
    proc = start(cwd, "--max_iters=10", "--eval_interval=10", "--out_dir=nudged", torchrun=["--standalone", "--nproc_per_node=2"],
                 env={"PYTHONPATH": str(tmp_path / "nudge")})
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-3000:]
    errors = re.findall(r"^error: .*$", output, re.M)
    assert len(errors) == 1 and "the weights differ between the 2 processes at the end (out_modulation):" in errors[0], output[-3000:]
    assert "weights identical" not in output
