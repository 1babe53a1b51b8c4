"""Smoke test of the speed benchmark (python -m moleflow.benchmark) on tiny data, on the CPU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from moleflow.benchmark.__main__ import main
from moleflow.benchmark.timing import PhaseClock
from moleflow.benchmark.synthetic import SyntheticSpec, generate_synthetic_dataset
from moleflow.data import load_class_split
from moleflow.trainer.continual_trainer import MoLEContinualTrainer

TINY = ["--data", "synthetic", "--classes", "2", "--n_train", "4", "--n_test", "6", "--min_px", "64",
        "--max_px", "80", "--weights", "random", "--set", "backbone_name=resnet18", "--set", "img_size=64",
        "--set", "feature_dim=32", "--set", "lora_rank=4", "--set", "num_coupling_layers=2",
        "--set", "num_epochs=1", "--set", "batch_size=4", "--quick_limits", "--e2e_images", "4",
        "--e2e_batch", "2", "--device", "cpu"]


def test_synthetic_dataset_layout_and_reuse(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_classes=2, n_train=3, n_test=5, min_px=40, max_px=60)
    root = tmp_path / "bench"
    classes = generate_synthetic_dataset(root, spec, processes=1)
    assert classes == ["class_00", "class_01"]
    split = load_class_split("folder", root, "class_01")
    assert len(split.train) == 3 and len(split.test) == 5
    assert sum(s.label for s in split.test) == 4 and all(s.mask_path for s in split.test if s.label)
    stamp = (root / "class_00" / "train" / "good" / "000.png").stat().st_mtime_ns
    generate_synthetic_dataset(root, spec, processes=1)  # same settings: nothing rewritten
    assert (root / "class_00" / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(tmp_path, spec, processes=1)  # a folder that holds other things


def test_phase_clock_charges_a_nested_phase_to_the_inner_one_only() -> None:
    clock = PhaseClock(torch.device("cpu"))
    started = time.perf_counter()
    with clock.phase("outer"):
        time.sleep(0.05)
        with clock.phase("inner"):
            time.sleep(0.1)
    wall = time.perf_counter() - started
    assert 0.05 <= clock.totals["outer"] < 0.09 and 0.1 <= clock.totals["inner"] < 0.14
    assert clock.totals["outer"] + clock.totals["inner"] <= wall


def test_benchmark_end_to_end_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bench.json"
    train_task, trained = MoLEContinualTrainer.train_task, []  # each train_task call's own wall time

    def timed_train_task(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return train_task(self, *args, **kwargs)
        finally:
            trained.append(time.perf_counter() - started)

    monkeypatch.setattr(MoLEContinualTrainer, "train_task", timed_train_task)
    started = time.perf_counter()
    main([*TINY, "--data_path", str(tmp_path / "data"), "--json", str(out), "--label", "smoke"])
    wall = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "NOTE: random backbone weights" in printed and "ratio training_over_flow_train_limit_fp32" in printed
    result = json.loads(out.read_text())
    run = result["run"]
    assert result["backbone_weights"] == "random" and result["backbone_weights_note"]
    for phase in ("setup", "data_check", "feature_extraction", "flow_training", "routing",
                  "evaluation", "e2e_measurement", "other"):
        assert phase in run["phases_s"]
    # no cache, no augmentation: images are decoded while the backbone runs, inside feature_extraction
    assert "data_decode" not in run["phases_s"] and run["decode_images_per_s"] is None
    phases = run["phases_s"]
    assert all(v >= 0 for v in phases.values())  # "other" too: no phase is counted twice
    assert run["run_total_s"] + phases["e2e_measurement"] <= wall  # within the test's own stopwatch
    assert phases["other"] < 0.25 * run["run_total_s"]  # the phases account for most of the run
    images = run["images"]  # --val_fraction 0.1 holds one of each class's 4 training images out
    assert images["train"] == 6 and images["held_out"] == 2 and images["test"] == 12 and images["decoded"] == 20
    assert run["training"]["image_steps"] == 6 and run["training"]["images_per_s"] > 0
    per_task = run["training"]["per_task"]
    assert sum(t["image_steps"] for t in per_task) == 6 and all(t["seconds"] > 0 for t in per_task)
    # each task's training time is its own train_task call (less the router's fit inside it, charged
    # to routing), as timed here independently of the benchmark's clock
    assert len(trained) == len(per_task) == 2
    for task, seconds in zip(per_task, trained):
        assert seconds - phases["routing"] - 0.01 <= task["seconds"] <= seconds + 0.01
    assert run["training"]["from_third_task_images_per_s"] is None  # 2 tasks: no third
    assert [p["tasks"] for p in run["inference_e2e"]["per_task_count"]] == [1, 2]
    predict = run["predict"]
    assert predict["tasks"] == 2 and predict["images_decoded"] == predict["images_files"] == 4
    assert predict["decoded_images_per_s"] > 0 and predict["files_images_per_s"] > 0
    assert "img/s from decoded tensors" in printed
    growth = run["parameters"]["total_after_each_task"]
    assert growth[1] - growth[0] == run["parameters"]["per_task"][1] > 0
    assert all(math.isfinite(v) for v in run["metrics"]["final_routed_mean"].values())
    assert math.isnan(run["metrics"]["final_oracle_mean"]["routing_acc"])  # the true task: routing n/a
    limits = result["limits"]
    assert limits["backbone_fp32_images_per_s"] > 0 and limits["reference_flow"]["fp32"]["train_images_per_s"] > 0
    assert set(result["ratios"]) >= {"training_over_flow_train_limit_fp32", "e2e_over_serial_limit_backbone_plus_flow_fp32"}
    assert set(result["goals"]) == {"run_total_s", "e2e_images_per_s", "training_over_flow_limit",
                                    "gpu_peak_reserved_gib"}


def test_benchmark_needs_an_explicit_weights_choice(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--data_path", str(tmp_path / "d"), "--skip_run", "--skip_limits"])


def test_profile_prints_the_three_tables(capsys: pytest.CaptureFixture) -> None:
    from moleflow.benchmark.profile import main as profile_main
    profile_main(["--dim", "16", "--grid", "4", "--batch", "2", "--steps", "1", "--rows", "3"])
    printed = capsys.readouterr().out
    assert "training step, task 0" in printed and "training step, task 1" in printed and "inference" in printed


def test_benchmark_preset_and_list_settings_reach_the_config(tmp_path: Path) -> None:
    from moleflow.benchmark.__main__ import build_parser, resolve_config
    args = build_parser().parse_args(["--weights", "random", "--preset", "paper_main",
                                      "--set", "feature_strides=4,8", "--set", "num_epochs=3"])
    config = resolve_config(args, ["a", "b"], "folder", tmp_path)
    assert config.ablation_preset == "paper_main"
    assert config.anomaly_score == "flow" and config.feature_pooling == "unfold"  # the preset's settings
    assert config.feature_strides == [4, 8] and config.num_epochs == 3  # --set wins over the preset
    with pytest.raises(SystemExit, match="comma-separated integers"):
        resolve_config(build_parser().parse_args(["--weights", "random", "--set", "feature_strides=8,x"]),
                       ["a"], "folder", tmp_path)
