"""Shared fixtures: tiny generated data and the flags of a tiny but complete run."""

from __future__ import annotations

import os
import subprocess
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINI_MVTEC = REPO.parent / "shared" / "data" / "mvtec_ad_mini"


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory) -> Path:
    """Every run of the tests keeps its feature cache in a temporary folder, never in $HOME."""
    root = tmp_path_factory.mktemp("feature_cache")
    os.environ["MOLEFLOW_CACHE_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The demo dataset at 64 px with few images (fabric, tile, nut)."""
    from moleflow.data import generate_demo_dataset
    root = tmp_path_factory.mktemp("data") / "tiny_demo"
    generate_demo_dataset(root, seed=0, size=64, n_train=8, n_test_good=3, n_test_defect=1)
    return root


def tiny_flags(data: Path, log_dir: Path, classes=("fabric", "tile"), epochs: int = 2) -> list[str]:
    """CLI flags of a tiny run: offline efficientnet_lite0, small flow, few epochs."""
    return ["--dataset", "folder", "--data_path", str(data), "--task_classes", *classes,
            "--backbone_name", "efficientnet_lite0", "--img_size", "64", "--feature_dim", "32",
            "--lora_rank", "4", "--num_coupling_layers", "2", "--num_epochs", str(epochs), "--batch_size", "4",
            "--log_dir", str(log_dir)]


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH`` (what it held stays:
    packages installed under a path of their own), plus ``extra``."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python run_moleflow.py ARGS`` as a user would."""
    env = repo_env()
    return subprocess.run([sys.executable, str(REPO / "run_moleflow.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def only_experiment(log_dir: Path) -> Path:
    dirs = [p for p in log_dir.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def kill_when_logged(flags: list[str], log_dir: Path, text: str, env: dict | None = None) -> Path:
    """Start ``python run_moleflow.py FLAGS``, SIGKILL it once its training.log (under ``log_dir``)
    holds ``text``, and return its experiment folder (the run must still be going by then)."""
    env = repo_env(**(env or {}))
    proc = subprocess.Popen([sys.executable, str(REPO / "run_moleflow.py"), *flags], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        logs = list(log_dir.glob("*/training.log"))
        if logs and text in logs[0].read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; raise its epochs"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return only_experiment(log_dir)
