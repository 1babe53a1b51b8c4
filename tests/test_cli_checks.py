"""Issue 16: every check before training, honest reports, a fast and quiet start.

End-to-end runs use the tiny demo data and the offline efficientnet_lite0 (no download).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, only_experiment, repo_env, run_cli, tiny_flags
from moleflow.cli_main import main
from moleflow.config.ablation import PRESETS, AblationConfig, ConfigError, config_fields
from moleflow.config.cli import HELP, build_parser, parse_config
from moleflow.data import DATASET_CLASSES, DataError, load_class_split, validate_samples

THREE = ("fabric", "tile", "nut")
METRICS = ("img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _one_line_error(argv: list[str], capsys, *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _no_experiment(log_dir: Path) -> None:
    assert not log_dir.exists() or not any(p.is_dir() for p in log_dir.iterdir())


# ---------------------------------------------------------------- results that say no more than was measured

@pytest.fixture(scope="module")
def oracle_2_1_run(tiny_data, tmp_path_factory):
    """wo_router (oracle), 2-1 scenario, a flag the preset makes moot; stdout/stderr not terminals."""
    log_dir = tmp_path_factory.mktemp("oracle")
    env = repo_env()
    args = [*tiny_flags(tiny_data, log_dir, classes=THREE, epochs=1), "--cl_scenario", "2-1",
            "--ablation_preset", "wo_router", "--use_mahalanobis"]
    raw = subprocess.run([sys.executable, str(REPO / "run_moleflow.py"), *args], cwd=REPO, env=env,
                         capture_output=True, timeout=600)
    # bytes decoded as they are: text mode would turn the bars' carriage returns into newlines
    proc = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, only_experiment(log_dir)


def test_oracle_run_reports_routing_as_not_measured(oracle_2_1_run):
    proc, exp = oracle_2_1_run
    for name in ("final_results.csv", "final_results_oracle.csv", "results_after_task_1.csv"):
        rows = _rows(exp / name)
        assert rows and all(r["routing_acc"] == "" for r in rows), name
    assert not (exp / "matrix_routing_acc.csv").exists()
    assert not (exp / "routing_confusion.png").exists() and not (exp / "routing_confusion.csv").exists()
    assert "routing_acc" not in {r["metric"] for r in _rows(exp / "continual_summary.csv")}
    assert "routing accuracy n/a (oracle)" in proc.stdout
    assert "routing n/a (oracle)" in (exp / "training.log").read_text()


@pytest.mark.parametrize("preset", ["wo_router", "baseline_nf", "lora_only", "wo_router_adapter"])
def test_oracle_presets_turn_the_router_off(preset):
    config, _ = parse_config(["--ablation_preset", preset])
    assert not config.use_router  # the evaluator then reports routing as n/a (tested above)


def test_summary_final_mean_is_the_class_mean_of_final_results(oracle_2_1_run):
    _, exp = oracle_2_1_run
    assert json.loads((exp / "config.json").read_text())["tasks"] == [["fabric", "tile"], ["nut"]]
    final = _rows(exp / "final_results.csv")
    assert [r["class_name"] for r in final] == [*THREE, "mean"]
    summary = {r["metric"]: float(r["final_mean"]) for r in _rows(exp / "continual_summary.csv")}
    for metric in METRICS:
        per_class = [float(r[metric]) for r in final[:-1]]
        assert summary[metric] == pytest.approx(float(final[-1][metric]), abs=1e-6), metric
        assert summary[metric] == pytest.approx(np.mean(per_class), abs=1e-6), metric


def test_preset_ignored_flag_warns_once_and_is_recorded(oracle_2_1_run):
    proc, exp = oracle_2_1_run
    warning = "--use_mahalanobis has no effect under --ablation_preset wo_router"
    assert proc.stderr.count(warning) == 1, proc.stderr
    config = json.loads((exp / "config.json").read_text())
    assert [item["flag"] for item in config["ignored_flags"]] == ["--use_mahalanobis"]
    assert "wo_router" in config["ignored_flags"][0]["reason"]
    assert warning in (exp / "training.log").read_text()


def test_output_to_a_file_has_no_progress_bars(oracle_2_1_run):
    proc, _ = oracle_2_1_run
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "\x1b" not in stream
    assert "=== task 1: nut ===" in proc.stdout  # plain progress lines instead


# ---------------------------------------------------------------- data checked before training

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_class_without_good_test_images_is_refused_before_training(tiny_data, tmp_path, capsys):
    data = _copy(tiny_data, tmp_path / "d")
    shutil.rmtree(data / "tile" / "test" / "good")
    _one_line_error(tiny_flags(data, tmp_path / "logs"), capsys, "'tile'", str(data / "tile" / "test" / "good"),
                    "defect-free")
    _no_experiment(tmp_path / "logs")


def test_class_without_defective_test_images_is_refused(tiny_data, tmp_path, capsys):
    data = _copy(tiny_data, tmp_path / "d")
    for folder in (data / "fabric" / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(data / "fabric" / "ground_truth")
    _one_line_error(tiny_flags(data, tmp_path / "logs"), capsys, "'fabric'", "defective",
                    str(data / "fabric" / "test"))
    _no_experiment(tmp_path / "logs")


def test_visa_class_without_anomalies_is_refused(tmp_path):
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"pcb1,{'train' if i < 2 else 'test'},normal,{i}.png,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    from moleflow.data import load_checked_splits
    with pytest.raises(DataError, match="label=anomaly"):
        load_checked_splits("visa", tmp_path, ["pcb1"])


def _mask_of(data: Path, class_name: str) -> tuple[Path, Path]:
    mask = sorted((data / class_name / "ground_truth").rglob("*_mask.png"))[0]
    image = data / class_name / "test" / mask.parent.name / mask.name.replace("_mask", "")
    return mask, image


def test_mask_with_another_aspect_ratio_is_an_error_naming_both_files(tiny_data, tmp_path, capsys):
    data = _copy(tiny_data, tmp_path / "d")
    mask, image = _mask_of(data, "tile")
    Image.fromarray(np.full((16, 64), 255, np.uint8)).save(mask)  # 64 x 16 beside a 64 x 64 image
    with pytest.raises(DataError) as info:
        validate_samples(load_class_split("folder", data, "tile").test)
    assert str(mask) in str(info.value) and str(image) in str(info.value) and "aspect" in str(info.value)
    _one_line_error(tiny_flags(data, tmp_path / "logs"), capsys, str(mask), str(image))
    _no_experiment(tmp_path / "logs")


def test_mask_of_another_scale_is_fine(tiny_data, tmp_path):
    data = _copy(tiny_data, tmp_path / "d")
    mask, _ = _mask_of(data, "tile")
    Image.fromarray(np.full((128, 128), 255, np.uint8)).save(mask)  # twice the image's size
    validate_samples(load_class_split("folder", data, "tile").test)


# ---------------------------------------------------------------- settings checked before training

@pytest.mark.parametrize("argv,needle", [
    (["--anomaly_map_sigma", "-1"], "--anomaly_map_sigma"),
    (["--score_aggregation_mode", "percentile", "--score_aggregation_percentile", "101"], "[0, 100]"),
    (["--grad_clip", "0"], "--grad_clip"),
    (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--num_workers", "-1"], "--num_workers"),
])
def test_out_of_range_settings_are_refused_at_parse_time(argv, needle):
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(argv)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_top_k_larger_than_the_patch_grid_is_refused_before_training(tiny_data, tmp_path, capsys):
    # efficientnet_lite0 at 64 px: an 8 x 8 grid of 64 patches
    _one_line_error([*tiny_flags(tiny_data, tmp_path / "logs"), "--score_aggregation_top_k", "100000"], capsys,
                    "--score_aggregation_top_k 100000", "8x8 = 64 patches", "k <= 64")
    _no_experiment(tmp_path / "logs")


class _EvaluationFailed(Exception):
    pass


def test_checkpoint_is_written_before_evaluation_and_resume_finishes(tiny_data, tmp_path, monkeypatch):
    import torch
    import moleflow.runner as runner_mod
    real = runner_mod.evaluate_class

    def failing(*args, **kwargs):
        raise _EvaluationFailed("evaluation broke")

    monkeypatch.setattr(runner_mod, "evaluate_class", failing)
    with pytest.raises(_EvaluationFailed):
        main(tiny_flags(tiny_data, tmp_path, classes=("fabric",), epochs=1))
    exp = only_experiment(tmp_path)
    saved = torch.load(exp / "checkpoint.pt", weights_only=True)
    assert saved["tasks_done"] == 1 and math.isnan(saved["history"]["img_auroc"][0][0])
    monkeypatch.setattr(runner_mod, "evaluate_class", real)
    assert main(["--resume", str(exp)]) == 0
    assert (exp / "results_after_task_0.csv").is_file() and (exp / "final_results.csv").is_file()
    matrix = _rows(exp / "matrix_img_auroc.csv")
    assert matrix[0]["fabric"] != ""  # the missing evaluation was made up on resume


# ---------------------------------------------------------------- flags that do what they say

def test_adam_honours_weight_decay_and_adamw_is_unchanged():
    import torch
    from moleflow.build import build_flow, build_trainer
    from moleflow.trainer import steps

    def step(optimizer: str, decay: float) -> tuple[float, torch.optim.Optimizer]:
        cfg = AblationConfig(feature_dim=16, lora_rank=2, num_coupling_layers=2, optimizer=optimizer,
                             weight_decay=decay, lr=0.1)
        trainer = build_trainer(cfg, build_flow(cfg, 16), torch.device("cpu"), logging.getLogger("test_adam"))
        s = trainer.settings
        weight = torch.nn.Parameter(torch.ones(4))
        opt = steps.make_optimizer(s.optimizer, [weight], s.lr, s.weight_decay, trainer.strategy, trainer.device)
        (0.0 * weight.sum()).backward()  # a zero gradient: only the decay can move the weight
        opt.step()
        return float(weight.detach().mean()), opt

    assert step("adam", 0.0)[0] == 1.0
    moved, opt = step("adam", 0.5)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["weight_decay"] == 0.5 and moved < 1.0
    _, opt = step("adamw", 0.01)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.01


def test_quiet_run_and_cuda_only_flags_on_cpu(tiny_data, tmp_path, oracle_2_1_run):
    proc = run_cli([*tiny_flags(tiny_data, tmp_path, classes=("fabric",), epochs=1), "--quiet", "--amp", "--tf32",
                    "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("mean image AUROC") and lines[1].startswith("results: ")
    assert len(oracle_2_1_run[0].stdout.splitlines()) > 10  # without --quiet: the log lines too
    for flag in ("--amp", "--tf32"):
        assert proc.stderr.count(f"warning: {flag} has no effect on cpu") == 1, proc.stderr
    exp = only_experiment(tmp_path)
    config = json.loads((exp / "config.json").read_text())
    assert config["config"]["amp"] is True and config["config"]["quiet"] is True
    assert config["effective"]["amp"] is False and config["effective"]["tf32"] is False
    assert "epoch 1/1" in (exp / "training.log").read_text()  # the log file stays complete


def test_preset_takes_shared_flags_but_typed_conflicts_stay_errors(capsys):
    from moleflow.config.cli import preset_ignored_flags
    config, explicit = parse_config(["--ablation_preset", "wo_lora", "--lora_rank", "8"])
    assert not config.use_lora and config.lora_rank == AblationConfig().lora_rank
    assert preset_ignored_flags(explicit) == {
        "lora_rank": "--lora_rank has no effect under --ablation_preset wo_lora (it sets --no_lora); ignored"}
    with pytest.raises(ConfigError, match="--lora_rank has no effect with --no_lora"):
        parse_config(["--no_lora", "--lora_rank", "8"])
    with pytest.raises(ConfigError, match="--score_aggregation_top_k"):
        parse_config(["--score_aggregation_mode", "max", "--score_aggregation_top_k", "5"])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_accepts_run_sh_shared_flags(preset):
    """bash run.sh ablations with EXTRA="--lora_rank 4 --dia_n_blocks 1 --tail_weight 0.5"."""
    from moleflow.config.cli import preset_ignored_flags
    config, explicit = parse_config(["--ablation_preset", preset, "--lora_rank", "4", "--dia_n_blocks", "1",
                                     "--tail_weight", "0.5"])
    for flag, value in (("lora_rank", 4), ("dia_n_blocks", 1), ("tail_weight", 0.5)):
        assert getattr(config, flag) == value or flag in preset_ignored_flags(explicit)


@pytest.mark.parametrize("dataset", ["visa", "mpdd"])
def test_each_dataset_has_its_own_default_classes(dataset):
    config, _ = parse_config(["--dataset", dataset])
    assert config.task_classes == DATASET_CLASSES[dataset]
    assert len(config.task_classes) == {"visa": 12, "mpdd": 6}[dataset]
    assert parse_config([])[0].task_classes == DATASET_CLASSES["mvtec"]


def test_folder_dataset_defaults_to_its_class_folders(tiny_data, tmp_path, capsys):
    config, _ = parse_config(["--dataset", "folder", "--data_path", str(tiny_data)])
    assert config.task_classes == ["fabric", "nut", "tile"]
    (tmp_path / "empty").mkdir()
    _one_line_error(["--dataset", "folder", "--data_path", str(tmp_path / "empty")], capsys,
                    "no class folders", "--task_classes")


def test_visa_without_task_classes_names_the_visa_files(tmp_path, capsys):
    _one_line_error(["--dataset", "visa", "--data_path", str(tmp_path)], capsys, "split_csv")


# ---------------------------------------------------------------- a fast start and honest --help

def _imports(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    env = repo_env()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "run_moleflow.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, modules


@pytest.mark.parametrize("args", [["--help"], ["--data_path", "/nonexistent/mvtec"], ["--lr", "-1"],
                                  ["--dataset", "folder", "--data_path", "/nonexistent/x", "--task_classes", "a"]])
def test_help_and_early_errors_do_not_import_torch(args):
    proc, modules = _imports(args)
    heavy = {"torch", "torchvision", "timm", "FrEIA", "scipy"} & modules
    assert not heavy, heavy
    if args == ["--help"]:
        assert proc.returncode == 0
    else:
        assert proc.returncode == 2 and "error: " in proc.stderr


def test_every_setting_has_a_help_text():
    assert set(HELP) == set(config_fields())
    for name, text in HELP.items():
        assert len(text) > len(name) + 10 and text != name.replace("_", " "), name
    helps = {a.dest: a.help for a in build_parser()._actions if a.dest != "help" and a.option_strings[0].startswith(
        "--") and not a.option_strings[0].startswith("--no_")}
    for name, choices in (("dataset", "mvtec visa mpdd folder"), ("optimizer", "adamw adam"),
                          ("device", "auto cpu cuda cuda:N"), ("score_aggregation_mode", "top_k max mean percentile"),
                          ("resize_mode", "crop squash"), ("anomaly_score", "flow memory fused"),
                          ("ablation_preset", " ".join(PRESETS))):
        assert all(choice in helps[name] for choice in choices.split()), name
    for name, unit in (("img_size", "pixels"), ("anomaly_map_sigma", "pixels"), ("num_epochs", "epochs"),
                       ("score_aggregation_top_k", "patches")):
        assert unit in helps[name], name
