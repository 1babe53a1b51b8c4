"""torchrun on the CPU (gloo): 2 processes give the plain run's metrics and routing, 1 process gives
its files byte for byte, one folder is written, --resume continues under torchrun; the helpers'
blocks and the loss decomposition the sharded training relies on."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, kill_when_logged, only_experiment, repo_env, run_cli, tiny_flags
from moleflow import distributed
from moleflow.models.loss import moleflow_loss

TOLERANCE = 1e-3
METRICS = ("img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro", "routing_acc")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node NPROC run_moleflow.py ARGS`` on the CPU."""
    env = {**repo_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(REPO / "run_moleflow.py"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {r["class_name"]: r for r in csv.DictReader(handle)}


def assert_close_results(a: Path, b: Path) -> None:
    """final_results.csv of two runs: every metric within TOLERANCE, routing identical."""
    rows_a, rows_b = _rows(a / "final_results.csv"), _rows(b / "final_results.csv")
    assert rows_a.keys() == rows_b.keys()
    for name, row in rows_a.items():
        for metric in METRICS:
            assert abs(float(row[metric]) - float(rows_b[name][metric])) <= TOLERANCE, (name, metric)
    per_image = [{k: r[k] for k in ("class_name", "path", "routed_task")} for r in
                 csv.DictReader(open(a / "per_image_scores.csv", newline=""))]
    per_image_b = [{k: r[k] for k in ("class_name", "path", "routed_task")} for r in
                   csv.DictReader(open(b / "per_image_scores.csv", newline=""))]
    assert per_image == per_image_b  # every test image routed to the same expert


@pytest.fixture(scope="module")
def plain_run(tiny_data, tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("plain")
    proc = run_cli(tiny_flags(tiny_data, log_dir, epochs=3))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return only_experiment(log_dir)


def test_two_processes_match_the_plain_run(plain_run, tiny_data, tmp_path):
    proc = torchrun(2, tiny_flags(tiny_data, tmp_path, epochs=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = only_experiment(tmp_path)  # process 0 alone writes, one folder
    assert_close_results(plain_run, exp)
    config = json.loads((exp / "config.json").read_text())
    assert (config["world_size"], config["backend"]) == (2, "gloo")
    assert proc.stdout.count("results: ") == 1  # the summary is printed once
    log = (exp / "training.log").read_text()
    assert log.count("=== task 1: tile ===") == 1  # one process logs to the file


def test_one_process_is_the_plain_run(plain_run, tiny_data, tmp_path):
    proc = torchrun(1, tiny_flags(tiny_data, tmp_path, epochs=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = only_experiment(tmp_path)
    for name in ("final_results.csv", "final_results_oracle.csv", "per_image_scores.csv", "thresholds.csv",
                 "matrix_img_auroc.csv"):
        assert (exp / name).read_bytes() == (plain_run / name).read_bytes(), name
    config = json.loads((exp / "config.json").read_text())
    assert (config["world_size"], config["backend"]) == (1, "none")


def test_resume_under_torchrun(plain_run, tiny_data, tmp_path):
    """A plain run killed during task 1, continued by 2 processes: the plain run's results."""
    exp = kill_when_logged(tiny_flags(tiny_data, tmp_path, epochs=3), tmp_path, "=== task 1: tile ===",
                           env={"OMP_NUM_THREADS": "1"})
    assert not (exp / "final_results.csv").exists()
    resumed = torchrun(2, ["--resume", str(exp)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_experiment(tmp_path) == exp
    assert "resumed from" in (exp / "training.log").read_text()
    assert json.loads((exp / "config.json").read_text())["world_size"] == 2
    assert_close_results(plain_run, exp)


def test_an_error_on_process_0_stops_every_process_in_one_line(tiny_data, tmp_path):
    """Process 0 cannot create the folder: both processes end with its one-line error, no hang."""
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    proc = torchrun(2, tiny_flags(tiny_data, blocked / "logs"), timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: cannot write to log dir")]
    assert sorted(line.endswith("(on process 0)") for line in errors) == [False, True]  # its own, the relayed


# ------------------------------------------------------------------------------- in one process
@pytest.mark.parametrize("n", [0, 1, 5, 16, 17])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_blocks_cover_the_rows_in_order(n, size, monkeypatch):
    blocks = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "_world", distributed.World(rank=rank, size=size))
        blocks.append(distributed.shard_range(n))
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert max(hi - lo for lo, hi in blocks) - min(hi - lo for lo, hi in blocks) <= 1


def test_alone_by_default_every_helper_is_the_identity():
    x = torch.randn(5, 3)
    assert distributed.world().size == 1 and distributed.gather_rows(x) is x
    assert distributed.all_sum(x) is x and distributed.on_writer(lambda: 7) == 7
    torch.testing.assert_close(distributed.by_rows(lambda lo, hi: x[lo:hi] * 2, 5), x * 2)


@pytest.mark.parametrize("tail_aware", [True, False])
def test_the_loss_of_a_batch_is_the_weighted_sum_of_its_slices(tail_aware):
    """What makes the sharded training the global batch's: L(batch) = sum_r (B_r / B) L(slice r)."""
    z, log_det = torch.randn(7, 4, 4, 8), torch.randn(7, 4, 4)
    whole = moleflow_loss(z, log_det, tail_aware=tail_aware)
    parts = sum(moleflow_loss(z[lo:hi], log_det[lo:hi], tail_aware=tail_aware) * (hi - lo) / 7
                for lo, hi in [(0, 3), (3, 5), (5, 7)])
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-5)
