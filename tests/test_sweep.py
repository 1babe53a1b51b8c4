"""run.sh / python -m moleflow.sweep: the job queue on CPU with tiny fake runs (PY=fake script):
parallel slots with CUDA_VISIBLE_DEVICES per job, failure reporting, presets read at run time,
and the summary written next to the runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from moleflow.config.ablation import PRESETS

REPO = Path(__file__).resolve().parents[1]

# A stand-in for run_moleflow.py: sleeps, records when and on which GPU it ran, writes a minimal
# experiment folder (config.json, final_results.csv, continual_summary.csv); FAKE_FAIL=<name> fails.
FAKE_RUN = r'''
import argparse, json, os, sys, time
from pathlib import Path
start = time.time()
parser = argparse.ArgumentParser()
for flag in ("--ablation_preset", "--seed", "--experiment_name", "--log_dir", "--data_path"):
    parser.add_argument(flag)
args, rest = parser.parse_known_args()
name = args.experiment_name
folder = Path(args.log_dir) / f"{name}_20260101_000000"
folder.mkdir(parents=True)
(folder / "training.log").write_text("started\n")
time.sleep(float(os.environ.get("FAKE_SLEEP", "1.0")))
record = {"name": name, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time(),
          "rest": rest, "data_path": args.data_path}
jobs = Path(os.environ["FAKE_RECORDS"])
jobs.mkdir(exist_ok=True)
(jobs / f"{name}.json").write_text(json.dumps(record))
if name == os.environ.get("FAKE_FAIL"):
    print("boom: fake failure", file=sys.stderr)
    sys.exit(3)
seed = int(args.seed)
config = {"ablation_preset": args.ablation_preset, "seed": seed, "experiment_name": name, "log_dir": args.log_dir,
          "task_classes": ["leather"], "lr": 0.0003}
(folder / "config.json").write_text(json.dumps({"config": config}))
value = 0.9 + 0.01 * seed
(folder / "final_results.csv").write_text(
    "task_id,class_name,routing_acc,img_auroc,pixel_auroc,img_ap,pixel_ap,aupro\n"
    f"0,leather,1.0,{value},0.9,0.9,0.5,0.8\nmean,mean,1.0,{value},0.9,0.9,0.5,0.8\n")
(folder / "continual_summary.csv").write_text(f"metric,final_mean,forgetting,bwt\nimg_auroc,{value},0.0,0.0\n")
'''


def sweep(tmp_path: Path, mode: str, **variables: str) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    """``bash run.sh MODE`` with the fake run; returns the process, LOG_DIR and the job records."""
    fake = tmp_path / "fake_run.py"
    fake.write_text(FAKE_RUN)
    log_dir, records = tmp_path / "sweep", tmp_path / "records"
    env = {**os.environ, "PYTHON": sys.executable, "PY": f"{sys.executable} {fake}", "LOG_DIR": str(log_dir),
           "FAKE_RECORDS": str(records), "DATA": str(tmp_path / "my data"), **variables}
    done = subprocess.run(["bash", str(REPO / "run.sh"), mode], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    jobs = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))] if records.is_dir() else []
    return done, log_dir, jobs


def most_at_once(jobs: list[dict]) -> int:
    events = sorted([(j["start"], 1) for j in jobs] + [(j["end"], -1) for j in jobs], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_two_gpus_run_two_at_a_time_then_summarize(tmp_path: Path) -> None:
    done, log_dir, jobs = sweep(tmp_path, "all", GPUS="0 1", SEEDS="0 1", PRESETS="full wo_lora",
                                EXTRA="--num_epochs 2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(j["name"] for j in jobs) == ["full_s0", "full_s1", "wo_lora_s0", "wo_lora_s1"]
    assert {j["gpu"] for j in jobs} == {"0", "1"}
    assert most_at_once(jobs) == 2  # both slots busy, never three runs at once
    for a in jobs:  # runs that overlap in time are on different GPUs
        for b in jobs:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["gpu"] != b["gpu"], (a, b)
    assert all(j["rest"] == ["--num_epochs", "2"] and j["data_path"] == str(tmp_path / "my data") for j in jobs)
    assert len((log_dir / "commands.txt").read_text().splitlines()) == 4
    groups = pd.read_csv(next(log_dir.glob("summary_*_groups.csv"))).set_index("group")
    assert list(groups.index) == ["full", "wo_lora"] and list(groups["n_runs"]) == [2, 2]
    assert groups.loc["full", "img_auroc_mean"] == pytest.approx(0.905, abs=1e-12)
    assert not list(tmp_path.glob("summary_*"))  # nothing in the cwd


def test_cpu_runs_one_by_one_and_a_failure_is_reported(tmp_path: Path) -> None:
    done, log_dir, jobs = sweep(tmp_path, "seeds", GPUS="cpu", SEEDS="0 1 2", FAKE_FAIL="full_s1",
                                FAKE_SLEEP="0.3")
    assert done.returncode == 1
    assert sorted(j["name"] for j in jobs) == ["full_s0", "full_s1", "full_s2"]  # the others went on
    assert most_at_once(jobs) == 1 and {j["gpu"] for j in jobs} == {""}
    report = done.stderr.strip().splitlines()
    assert report[-2] == "1 of 3 run(s) failed:"
    console = log_dir / "console" / "full_s1.log"
    assert report[-1].startswith("  full_s1: exit 3; console ") and str(console) in report[-1]
    assert "training.log" in report[-1]
    assert "boom: fake failure" in console.read_text()
    groups = pd.read_csv(next(log_dir.glob("summary_*_groups.csv")))
    assert list(groups["n_runs"]) == [2] and groups.loc[0, "seeds"] == "0 2"  # the finished runs


def test_ablations_take_every_preset_of_the_config(tmp_path: Path) -> None:
    done, _, _ = sweep(tmp_path, "ablations", DRY_RUN="1", SEEDS="4 5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split("--ablation_preset ")[1].split()[0] for line in lines] == list(PRESETS)
    assert all("--seed 4 " in line and "--experiment_name " in line for line in lines)


def test_feature_cache_is_passed_to_every_run(tmp_path: Path) -> None:
    cache = tmp_path / "shared cache"
    done, _, _ = sweep(tmp_path, "ablations", DRY_RUN="1", FEATURE_CACHE=str(cache))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(PRESETS) and all(f"--feature_cache '{cache}'" in line for line in lines)
    done, _, _ = sweep(tmp_path, "main", DRY_RUN="1")
    assert "--feature_cache" not in done.stdout  # unset: each run uses the default location


def test_bad_variables_are_refused(tmp_path: Path) -> None:
    for variables in ({"GPUS": "zero"}, {"PRESETS": "full wo_nothing"}, {"EXTRA": "--num_epochs 2 --seed=3"}):
        done, log_dir, _ = sweep(tmp_path, "all", **variables)
        assert done.returncode == 2 and done.stderr.startswith("error:"), (variables, done.stderr)
        assert not log_dir.exists()
    done, _, _ = sweep(tmp_path, "nonsense")
    assert done.returncode == 2 and "usage" in done.stderr
