"""Durable runs: SIGKILL + --resume, adding tasks later, reproducibility, broken checkpoints."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from conftest import kill_when_logged, only_experiment, run_cli, tiny_flags
from moleflow.cli_main import main

THREE = ("fabric", "tile", "nut")


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {r["class_name"]: r for r in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 3-task run (seed 0)."""
    log_dir = tmp_path_factory.mktemp("ref")
    proc = run_cli([*tiny_flags(tiny_data, log_dir, classes=THREE, epochs=6)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return only_experiment(log_dir)


def test_same_seed_same_bytes(reference_run, tiny_data, tmp_path):
    proc = run_cli([*tiny_flags(tiny_data, tmp_path, classes=THREE, epochs=6)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = only_experiment(tmp_path)
    for name in ("final_results.csv", "final_results_oracle.csv", "matrix_img_auroc.csv"):
        assert (again / name).read_bytes() == (reference_run / name).read_bytes(), name


def test_sigkill_during_task_2_then_resume_matches(reference_run, tiny_data, tmp_path):
    exp = kill_when_logged(tiny_flags(tiny_data, tmp_path, classes=THREE, epochs=6), tmp_path, "task 2 epoch 1/")
    assert not (exp / "final_results.csv").exists()
    resumed = run_cli(["--resume", str(exp)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in (exp / "training.log").read_text()
    for name in ("final_results.csv", "final_results_oracle.csv", "matrix_img_auroc.csv", "continual_summary.csv"):
        assert (exp / name).read_bytes() == (reference_run / name).read_bytes(), name


def test_add_a_task_to_a_finished_run(tiny_data, tmp_path):
    first = tmp_path / "first"
    proc = run_cli([*tiny_flags(tiny_data, first, classes=("fabric", "tile"), epochs=3)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    old = only_experiment(first)
    more = tmp_path / "more"
    proc = run_cli(["--resume", str(old), "--task_classes", "nut", "--log_dir", str(more)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = only_experiment(more)
    assert old.name.startswith("moleflow_2") and new.name.startswith("moleflow_ext_")  # logs/moleflow_2* != it
    before = _rows(old / "final_results_oracle.csv")
    after = _rows(new / "final_results_oracle.csv")
    for name in ("fabric", "tile"):
        for col in ("img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro"):
            assert after[name][col] == before[name][col], (name, col)
    routed = _rows(new / "final_results.csv")
    assert set(routed) == {"fabric", "tile", "nut", "mean"} and routed["nut"]["task_id"] == "2"
    with open(new / "routing_confusion.csv") as handle:
        assert len(list(csv.reader(handle))) == 4  # header + 3 tasks
    assert (new / "results_after_task_2.csv").is_file()


def test_resume_refuses_other_architecture(reference_run, capsys):
    code = main(["--resume", str(reference_run), "--task_classes", "extra", "--lora_rank", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "lora_rank: saved 4, now 8" in err


def test_resume_of_finished_run_without_new_classes(reference_run, capsys):
    assert main(["--resume", str(reference_run)]) == 2
    assert "--task_classes" in capsys.readouterr().err


def test_corrupt_and_truncated_checkpoints(reference_run, tmp_path, capsys):
    import shutil
    for mode in ("truncate", "garbage"):
        exp = tmp_path / mode
        shutil.copytree(reference_run, exp)
        ckpt = exp / "checkpoint.pt"
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2] if mode == "truncate" else b"\x00garbage" * 100)
        code = main(["--resume", str(exp), "--task_classes", "extra"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "corrupt or truncated" in err and str(ckpt) in err
        assert len(err.splitlines()) == 1


def test_checkpoint_loads_with_weights_only(reference_run):
    import torch
    data = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    assert data["tasks_done"] == 3 and data["tasks"] == [["fabric"], ["tile"], ["nut"]]


def test_extending_from_another_data_root_names_the_rule(reference_run, tiny_data, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_data / "nut", other / "bolt")  # a new class, alone under another root
    code = main(["--resume", str(reference_run), "--data_path", str(other), "--task_classes", "bolt",
                 "--log_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "one data root" in err and "fabric" in err and str(other) in err and str(tiny_data) in err


def test_extended_run_gets_its_own_name_unless_one_is_given(reference_run, tiny_data, tmp_path, monkeypatch):
    """<old>_ext by default, --experiment_name wins (the run itself is replaced: nothing trains)."""
    import moleflow.runner as runner_mod
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.copytree(tiny_data / "nut", data / "bolt")
    names = []

    def record(config, **kwargs):
        names.append(config.experiment_name)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "run", record)
    for extra in ([], ["--experiment_name", "more"]):
        assert main(["--resume", str(reference_run), "--data_path", str(data), "--task_classes", "bolt", *extra]) == 130
    assert names == ["moleflow_ext", "more"]


def test_a_checkpoint_of_the_older_format_is_refused_in_one_line(tmp_path):
    import torch
    from moleflow.checkpoint import CheckpointError, load_checkpoint
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "moleflow-checkpoint-v1", "model": {}}, path)
    with pytest.raises(CheckpointError, match="older MoLE-Flow .* start a new run"):
        load_checkpoint(path)
