"""The research CLI end to end on tiny data, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MINI_MVTEC, only_experiment, run_cli, tiny_flags
from moleflow.cli_main import main
from moleflow.config.ablation import config_fields


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_end_to_end(tiny_data, tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_cli([*tiny_flags(tiny_data, log_dir, classes=("fabric", "tile", "nut")), "--run_diagnostics",
                    "--experiment_name", "e2e", "--compile_flow"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    exp = only_experiment(log_dir)
    assert exp.name.startswith("e2e_")
    for name in ["config.json", "training.log", "final_results.csv", "final_results_oracle.csv",
                 "results_after_task_0.csv", "results_after_task_1.csv", "results_after_task_2.csv",
                 "continual_summary.csv", "matrix_img_auroc.csv", "matrix_aupro.csv", "routing_confusion.csv",
                 "routing_confusion.png", "checkpoint.pt"]:
        assert (exp / name).is_file(), name
    for name in ["latent_vs_gaussian.png", "logdet_spread.png", "znorm_vs_logdet.png", "scores_fabric.png",
                 "overlays_nut.png", "accuracy_matrix_img_auroc.png"]:
        assert (exp / "diagnostics" / name).stat().st_size > 1000, name
    config = json.loads((exp / "config.json").read_text())
    assert set(config["config"]) == set(config_fields())
    assert config["config"]["num_epochs"] == 2 and "run_moleflow.py" in config["command_line"]
    assert config["versions"]["torch"] and config["tasks"] == [["fabric"], ["tile"], ["nut"]]
    rows = _rows(exp / "final_results.csv")
    assert [r["class_name"] for r in rows] == ["fabric", "tile", "nut", "mean"]
    assert list(rows[0]) == ["task_id", "class_name", "routing_acc", "img_auroc", "pixel_auroc", "img_ap",
                             "pixel_ap", "aupro", "f1_at_threshold", "precision_at_threshold", "recall_at_threshold",
                             "f1_max_test_picked"]
    for col in list(rows[0])[2:]:
        values = [float(r[col]) for r in rows[:-1]]
        assert float(rows[-1][col]) == pytest.approx(np.mean(values), abs=1e-6)
    assert len(_rows(exp / "results_after_task_0.csv")) == 2  # one class + means
    log = (exp / "training.log").read_text()
    assert "trainable parameters" in log and "epoch 2/2" in log and "after task 2" in log
    assert "--compile_flow has no effect on cpu" in log and config["config"]["compile_flow"] is True
    assert "mean image AUROC" in proc.stdout
    oracle = _rows(exp / "final_results_oracle.csv")
    assert all(r["routing_acc"] == "" for r in oracle)  # the true task was given: nothing was routed
    if all(float(r["routing_acc"]) == 1.0 for r in rows):
        for routed, given in zip(rows, oracle):
            assert {k: v for k, v in routed.items() if k != "routing_acc"} == \
                   {k: v for k, v in given.items() if k != "routing_acc"}


def test_oracle_routing_has_zero_forgetting(tiny_data, tmp_path):
    proc = run_cli([*tiny_flags(tiny_data, tmp_path, classes=("fabric", "tile", "nut")), "--no_router"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    exp = only_experiment(tmp_path)
    summary = {r["metric"]: r for r in _rows(exp / "continual_summary.csv")}
    for metric in ("img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro"):
        assert float(summary[metric]["forgetting"]) == 0.0 and float(summary[metric]["bwt"]) == 0.0
    assert (exp / "final_results.csv").read_bytes() == (exp / "final_results_oracle.csv").read_bytes()


def _expect_error(argv: list[str], capsys, *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    _expect_error(tiny_flags(missing, tmp_path / "logs"), capsys, str(missing), "--data_path")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_unknown_class_lists_valid_ones(tiny_data, tmp_path, capsys):
    _expect_error(tiny_flags(tiny_data, tmp_path / "logs", classes=("fabric", "bottle")), capsys,
                  "bottle", "fabric", "nut", "tile")


def test_empty_train_folder(tiny_data, tmp_path, capsys):
    data = _copy(tiny_data, tmp_path / "d")
    for f in (data / "tile" / "train" / "good").iterdir():
        f.unlink()
    _expect_error(tiny_flags(data, tmp_path / "logs"), capsys, "train")


def test_corrupt_image(tiny_data, tmp_path, capsys):
    data = _copy(tiny_data, tmp_path / "d")
    victim = sorted((data / "fabric" / "test" / "good").iterdir())[0]
    victim.write_bytes(b"not a png at all")
    _expect_error(tiny_flags(data, tmp_path / "logs"), capsys, victim.name)


def test_defect_image_without_mask(tiny_data, tmp_path, capsys):
    data = _copy(tiny_data, tmp_path / "d")
    mask = sorted((data / "tile" / "ground_truth").rglob("*_mask.png"))[0]
    mask.unlink()
    _expect_error(tiny_flags(data, tmp_path / "logs"), capsys, "mask", mask.name.replace("_mask", ""))


def test_mask_without_image(tiny_data, tmp_path, capsys):
    data = _copy(tiny_data, tmp_path / "d")
    defect_dir = sorted(p for p in (data / "tile" / "ground_truth").iterdir())[0]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(defect_dir / "999_mask.png")
    _expect_error(tiny_flags(data, tmp_path / "logs"), capsys, "999_mask.png")


def test_unknown_backbone(tiny_data, tmp_path, capsys):
    flags = tiny_flags(tiny_data, tmp_path / "logs")
    flags[flags.index("efficientnet_lite0")] = "wide_resnet50_3"
    _expect_error(flags, capsys, "wide_resnet50_3", "wide_resnet50_2")


def test_missing_backbone_weights_file(tiny_data, tmp_path, capsys):
    _expect_error([*tiny_flags(tiny_data, tmp_path / "logs"), "--backbone_weights", str(tmp_path / "w.pth")],
                  capsys, "w.pth")


def test_conflicting_flags(tiny_data, tmp_path, capsys):
    _expect_error([*tiny_flags(tiny_data, tmp_path / "logs"), "--no_lora"], capsys, "--lora_rank", "--no_lora")
    with pytest.raises(SystemExit) as info:
        main(["--use_dia", "--no_dia"])
    assert info.value.code == 2


def test_unwritable_log_dir(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _expect_error(tiny_flags(tiny_data, blocker / "logs"), capsys, "--log_dir")


def test_full_disk_fails_before_training(tiny_data, tmp_path, capsys, monkeypatch):
    import shutil as sh
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    _expect_error(tiny_flags(tiny_data, tmp_path / "logs"), capsys, "free", "--log_dir")


@pytest.mark.skipif(not MINI_MVTEC.is_dir(), reason="real MVTec AD mini data absent")
def test_real_mvtec_mini_runs(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_cli(["--dataset", "folder", "--data_path", str(MINI_MVTEC), "--task_classes", "hazelnut", "transistor",
                    "--backbone_name", "efficientnet_lite0", "--img_size", "96", "--feature_dim", "64",
                    "--lora_rank", "4", "--num_coupling_layers", "2", "--num_epochs", "1", "--batch_size", "8",
                    "--log_dir", str(log_dir)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(only_experiment(log_dir) / "final_results.csv")
    assert [r["class_name"] for r in rows] == ["hazelnut", "transistor", "mean"]
    assert all(0.0 <= float(r["pixel_auroc"]) <= 1.0 for r in rows)


def test_augmentation_recomputes_features_every_epoch(tiny_data, tmp_path, monkeypatch):
    """--use_augmentation re-runs the backbone on new augmentations each epoch (and changes results)."""
    from moleflow.extractors.source import FeatureSource
    calls = []
    real = FeatureSource.features

    def counting(self, dataset, keep_masks, desc, *args):
        calls.append(desc)
        return real(self, dataset, keep_masks, desc, *args)

    monkeypatch.setattr(FeatureSource, "features", counting)
    assert main([*tiny_flags(tiny_data, tmp_path / "aug", classes=("fabric",), epochs=3), "--use_augmentation"]) == 0
    assert calls.count("task 0 features") == 3  # clean once + 2 refreshed epochs
    calls.clear()
    assert main(tiny_flags(tiny_data, tmp_path / "plain", classes=("fabric",), epochs=3)) == 0
    assert calls.count("task 0 features") == 1
    aug = (only_experiment(tmp_path / "aug") / "final_results.csv").read_text()
    plain = (only_experiment(tmp_path / "plain") / "final_results.csv").read_text()
    assert aug != plain
