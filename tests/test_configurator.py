import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = f"""
import os
batch_size = 64
learning_rate = 6e-4
compile = True
device = 'cuda'
classes = (1, 2)
mlflow_tracking_uri = None
exec(open({os.path.join(REPO, 'configurator.py')!r}).read())
print('CONFIG=' + repr({{k: globals()[k] for k in config_keys}}))
"""

@pytest.fixture
def run(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)

    def run(*args):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path)
        config = None
        for line in proc.stdout.splitlines():
            if line.startswith("CONFIG="):
                config = ast.literal_eval(line[len("CONFIG=") :])
        return proc, config

    return run

def test_defaults_and_overrides(run, tmp_path):
    proc, config = run()
    assert proc.returncode == 0
    assert config == dict(
        batch_size=64, learning_rate=6e-4, compile=True, device="cuda", classes=(1, 2), mlflow_tracking_uri=None
    )
    proc, config = run(
        "--batch_size=32", "--learning_rate=1", "--compile=False", "--device=cpu", "--classes=3,5",
        "--mlflow_tracking_uri=http://127.0.0.1:8080",
    )
    assert proc.returncode == 0, proc.stderr
    assert config == dict(
        batch_size=32, learning_rate=1.0, compile=False, device="cpu", classes=(3, 5),
        mlflow_tracking_uri="http://127.0.0.1:8080",
    )
    assert type(config["learning_rate"]) is float  # int accepted for a float key
    _, config = run("--classes=7", "--device='mps'")
    assert config["classes"] == (7,) and config["device"] == "mps"
    _, config = run("--classes=[4, 4, 4]")
    assert config["classes"] == (4, 4, 4)

def test_config_file_then_override(run, tmp_path):
    (tmp_path / "conf.py").write_text("import math\nbatch_size = 128\nlearning_rate = 2 * math.pi\n_helper = 3\n")
    proc, config = run("conf.py", "--batch_size=16")
    assert proc.returncode == 0, proc.stderr
    assert config["batch_size"] == 16 and abs(config["learning_rate"] - 6.283185307179586) < 1e-12

def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

def test_unknown_key_suggests_close_keys(run):
    proc, _ = run("--batchsize=3")
    assert_one_line_error(proc, "unknown config key 'batchsize'", "batch_size")
    proc, _ = run("--zzz=3")
    assert_one_line_error(proc, "unknown config key 'zzz'", "--help")

def test_type_mismatch(run):
    proc, _ = run("--batch_size=0.5")
    assert_one_line_error(proc, "batch_size", "expects int", "float")
    proc, _ = run("--compile=1")  # bool only from True/False
    assert_one_line_error(proc, "compile", "expects bool", "int")
    proc, _ = run("--batch_size=True")
    assert_one_line_error(proc, "batch_size", "expects int", "bool")
    proc, _ = run("--learning_rate=fast")
    assert_one_line_error(proc, "learning_rate", "expects float", "str 'fast'")

def test_config_file_errors(run, tmp_path):
    proc, _ = run("config/missing.py")
    assert_one_line_error(proc, "cannot read config file 'config/missing.py'")
    (tmp_path / "typo.py").write_text("batch_sise = 3\n")
    proc, _ = run("typo.py")
    assert_one_line_error(proc, "unknown config key 'batch_sise'", "typo.py", "batch_size")
    (tmp_path / "wrong_type.py").write_text("compile = 'yes'\n")
    proc, _ = run("wrong_type.py")
    assert_one_line_error(proc, "compile", "wrong_type.py", "expects bool")
    (tmp_path / "broken.py").write_text("batch_size = 1 +\n")
    proc, _ = run("broken.py")
    assert_one_line_error(proc, "config file 'broken.py' failed", "SyntaxError")

def test_missing_value_and_help(run):
    proc, _ = run("--compile")
    assert_one_line_error(proc, "'--compile' has no value", "--compile=VALUE")
    proc, config = run("--help")
    assert proc.returncode == 0 and config is None
    assert "--batch_size=64" in proc.stdout and "--classes=(1, 2)" in proc.stdout
