"""Every setting changes what a run does, or is refused: a check per ``AblationConfig`` field.

Each check changes one setting of a small base configuration and shows the difference where the
setting acts: the flow, trainer, scores, router, extractor or data that ``moleflow.build`` makes
from the config (what the runner uses), the files and console lines of a real tiny run, or a
refusal or warning. A field without a check fails ``test_every_setting_has_a_check``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

import moleflow.runner as runner_mod
from conftest import tiny_flags
from moleflow.build import (
    build_backbone, build_dataset, build_feature_source, build_flow, build_router, build_trainer, score_settings,
)
from moleflow.cli_main import check_data, main
from moleflow.config.ablation import DEMO_SETTINGS, AblationConfig, ConfigError, apply_overrides, config_fields
from moleflow.config.cli import parse_config
from moleflow.data import DataError, Sample, load_class_split
from moleflow.evaluation.evaluator import evaluate_class, task_memory
from moleflow.extractors import decoding
from moleflow.extractors.cache_files import cache_entries
from moleflow.extractors.features import FeatureSet
from moleflow.extractors.source import FeatureSource
from moleflow.models import fusion
from moleflow.precompile import CompileAhead
from moleflow.trainer.continual_trainer import TrainingError

D = 8
CPU = torch.device("cpu")
LOG = logging.getLogger("test_flags")
BASE = apply_overrides(AblationConfig(), {
    "feature_dim": D, "num_coupling_layers": 2, "lora_rank": 2, "num_epochs": 2, "batch_size": 4, "warmup_epochs": 1,
    "memory_size": 50, "backbone_name": "efficientnet_lite0", "img_size": 64, "dataset": "folder"})
CHECKED: set[str] = set()


def config(**changes: Any) -> AblationConfig:
    return apply_overrides(BASE, changes).validate()


def covers(*fields: str) -> Callable:
    CHECKED.update(fields)
    return lambda fn: fn


def test_every_setting_has_a_check() -> None:
    assert CHECKED == set(config_fields()), f"settings without a check: {sorted(set(config_fields()) - CHECKED)}"


# ------------------------------------------------------------------------------ the flow

FLOW = {"num_coupling_layers": 3, "dia_n_blocks": 1, "lora_rank": 3, "lora_alpha": 2.0, "clamp_alpha": 1.0,
        "dia_hidden_ratio": 1.0, "scale_context_kernel": 3, "spatial_context_kernel": 5, "use_lora": False,
        "use_dia": False, "use_task_adapter": False, "use_whitening_adapter": False, "use_pos_embed": False,
        "use_spatial_context": False, "use_scale_context": False, "seed": 1}
covers(*FLOW)


def _flow(cfg: AblationConfig) -> tuple[dict[str, tuple], torch.Tensor, torch.Tensor]:
    """The built flow's parameter shapes and its (z, log-det) for task 1 on a fixed input, every
    parameter moved off its initial value the same way."""
    torch.manual_seed(0)
    model = build_flow(cfg, D).double()
    model.add_task()
    model.add_task()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        z, log_det = model(torch.randn(2, 3, 3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 1)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}, z, log_det


@pytest.mark.parametrize("field", list(FLOW))
def test_flow_settings_change_the_flow(field: str) -> None:
    shapes, z, log_det = _flow(BASE)
    shapes2, z2, log_det2 = _flow(config(**{field: FLOW[field]}))
    assert shapes != shapes2 or not torch.allclose(z, z2) or not torch.allclose(log_det, log_det2)


# ------------------------------------------------------------------------------ training

TRAIN = {"num_epochs": 3, "lr": 1e-2, "batch_size": 3, "optimizer": "adam", "weight_decay": 0.5, "grad_clip": 0.01,
         "warmup_epochs": 0, "use_tail_aware_loss": False, "tail_weight": 0.3, "tail_top_k_ratio": 0.5,
         "lambda_logdet": 0.1, "freeze_base": False, "seed": 1}
SLOW = {"enable_slow_stage": False, "slow_blocks_k": 1, "slow_lr_ratio": 1.0, "slow_stage_start": 0.7}
covers(*TRAIN, *SLOW)


def _features(task: int, nan_batch: bool = False) -> FeatureSet:
    patches = torch.randn(10, 4, 4, D, generator=torch.Generator().manual_seed(task)) + task
    if nan_batch:
        patches[0, 0, 0, 0] = float("nan")  # one image: one batch in three each epoch
    return FeatureSet(patches, patches.mean(dim=(1, 2)), torch.zeros(10, dtype=torch.long), None)


def _trained(cfg: AblationConfig) -> dict[str, torch.Tensor]:
    """The flow's weights after training two tasks with the trainer the builders make."""
    torch.manual_seed(0)
    model = build_flow(cfg, D)
    trainer = build_trainer(cfg, model, CPU, LOG)
    for task in range(2):
        trainer.train_task(task, _features(task))
    return model.state_dict()


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("field", list(TRAIN))
def test_training_settings_change_the_trained_weights(field: str) -> None:
    assert _differ(_trained(BASE), _trained(config(**{field: TRAIN[field]})))


@pytest.mark.parametrize("field", list(SLOW))
def test_slow_stage_settings_change_the_trained_weights(field: str) -> None:
    slow = {"enable_slow_stage": True, "num_epochs": 4, "slow_stage_start": 0.5}  # from the third epoch
    assert _differ(_trained(config(**slow)), _trained(config(**{**slow, field: SLOW[field]})))


@covers("max_skip_fraction")
def test_max_skip_fraction_decides_when_non_finite_batches_stop_a_task() -> None:
    def train(cfg: AblationConfig) -> None:
        build_trainer(cfg, build_flow(cfg, D), CPU, LOG).train_task(0, _features(0, nan_batch=True))

    with pytest.raises(TrainingError, match="non-finite"):
        train(BASE)  # one batch in three skipped: over the default 5 %
    train(config(max_skip_fraction=0.5))


@covers("cuda_graphs")
def test_cuda_graphs_decides_whether_the_cuda_step_is_recorded() -> None:
    cuda = torch.device("cuda")  # no tensor is made there: the trainer only chooses its step
    assert build_trainer(BASE, build_flow(BASE, D), cuda, LOG).strategy.graphs
    assert not build_trainer(config(cuda_graphs=False), build_flow(BASE, D), cuda, LOG).strategy.graphs
    assert not build_trainer(BASE, build_flow(BASE, D), CPU, LOG).strategy.graphs


# ------------------------------------------------------------------------------ scoring and routing

SCORE = {"score_aggregation_mode": "max", "score_aggregation_top_k": 5, "anomaly_map_sigma": 1.0,
         "anomaly_score": "flow", "memory_size": 10, "memory_weight": 0.3}
covers(*SCORE, "score_aggregation_percentile")


def _scores(cfg: AblationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and anomaly maps of one class, scored as the builders' settings say."""
    torch.manual_seed(0)
    model = build_flow(cfg, D)
    model.add_task()
    settings = score_settings(cfg)
    memory = None
    if cfg.anomaly_score != "flow":
        from moleflow.models.memory import PatchMemory
        memory = PatchMemory()
        memory.add_task(task_memory(model, _features(0), 0, settings, CPU))
    test = _features(1)
    test.labels = torch.tensor([0, 1] * 5)
    test.masks = (torch.rand(10, 16, 16, generator=torch.Generator().manual_seed(3)) > 0.7).to(torch.uint8)
    result = evaluate_class(model, test, "c", 0, settings, CPU, keep_maps=True, memory=memory)
    return result.image_scores, result.maps


@pytest.mark.parametrize("field", list(SCORE))
def test_scoring_settings_change_the_scores(field: str) -> None:
    scores, maps = _scores(BASE)
    scores2, maps2 = _scores(config(**{field: SCORE[field]}))
    assert not torch.allclose(scores, scores2) or not torch.allclose(maps, maps2)


def test_score_percentile_changes_the_image_scores() -> None:
    base = config(score_aggregation_mode="percentile")
    assert not torch.allclose(_scores(base)[0], _scores(config(score_aggregation_mode="percentile",
                                                               score_aggregation_percentile=50.0))[0])


@covers("use_mahalanobis")
def test_use_mahalanobis_changes_the_route() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.ones(8)
    wide[0] = 20.0
    tasks = [torch.randn(200, 8, generator=gen) * wide, torch.randn(200, 8, generator=gen) + torch.eye(8)[1] * 4]
    probe = torch.eye(8)[:1] * 10.0  # far along task 0's long axis
    routes = []
    for cfg in (BASE, config(use_mahalanobis=False)):
        router = build_router(cfg)
        for feats in tasks:
            router.add_task(feats)
        routes.append(int(router.route(probe)))
    assert routes == [0, 1]


# ------------------------------------------------------------------------------ backbone and data

EXTRACTOR = {"backbone_name": "resnet18", "feature_dim": 16, "feature_strides": [8, 16], "feature_pooling": "unfold",
             "img_size": 96}
covers(*EXTRACTOR)


def _extracted(cfg: AblationConfig, weights: str = "random") -> tuple[tuple, tuple, torch.Tensor]:
    torch.manual_seed(0)
    extractor = build_backbone(cfg, CPU, weights)
    with torch.no_grad():
        size = cfg.img_size
        out = extractor(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4)))
    return tuple(extractor.layer_dims()), tuple(extractor.grid_size()), out


@pytest.mark.parametrize("field", list(EXTRACTOR))
def test_backbone_settings_change_the_features(field: str) -> None:
    dims, grid, out = _extracted(BASE)
    dims2, grid2, out2 = _extracted(config(**{field: EXTRACTOR[field]}))
    assert (dims, grid, out.shape) != (dims2, grid2, out2.shape) or not torch.allclose(out, out2)


@covers("backbone_weights")
def test_backbone_weights_load_a_local_file(tmp_path: Path) -> None:
    extractor = build_backbone(BASE, CPU)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in extractor.backbone.state_dict().items()}
    torch.save(state, tmp_path / "weights.pth")
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        other = build_backbone(config(backbone_weights=str(tmp_path / "weights.pth")), CPU)(image)
        assert not torch.allclose(extractor(image), other)


@covers("img_size", "resize_mode")
def test_image_size_and_resize_mode_change_the_images(tmp_path: Path) -> None:
    image = Image.new("RGB", (120, 60), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 30, 60))  # a white band at the left edge: cropped away by crop
    image.save(tmp_path / "wide.png")
    sample = [Sample(tmp_path / "wide.png", 0, None, "good", "c")]
    crop = build_dataset(config(img_size=48), sample)[0]["image"]
    assert build_dataset(config(img_size=32), sample)[0]["image"].shape != crop.shape
    squash = build_dataset(config(img_size=48, resize_mode="squash"), sample)[0]["image"]
    assert squash.shape == crop.shape and squash[0, :, 0].mean() > crop[0, :, 0].mean() + 1.0


@covers("dataset", "data_path", "task_classes")
def test_dataset_data_path_and_classes_choose_what_is_loaded(tiny_data: Path, tmp_path: Path) -> None:
    base = config(data_path=str(tiny_data), task_classes=["fabric", "tile"])
    assert set(check_data(base)) == {"fabric", "tile"}
    assert set(check_data(apply_overrides(base, {"task_classes": ["nut"]}))) == {"nut"}
    with pytest.raises(DataError, match="split_csv"):
        check_data(apply_overrides(base, {"dataset": "visa"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        check_data(apply_overrides(base, {"data_path": str(tmp_path / "empty")}))
    assert load_class_split("folder", tiny_data, "tile").train


# ------------------------------------------------------------------------------ a real tiny run

RUN_FLAGS = ["--cl_scenario", "2-1", "--no_router", "--no_eval_oracle", "--run_diagnostics", "--quiet",
             "--experiment_name", "other", "--num_workers", "1", "--use_augmentation", "--amp", "--tf32",
             "--compile_flow", "--val_fraction", "0"]


def _main(argv: list[str]) -> dict[str, Any]:
    """Run the CLI in this process; return its exit code, console text and how often the features of
    the first task's training images were made."""
    calls = {"task 0 features": 0}
    features = FeatureSource.features

    def counting_features(self: FeatureSource, dataset: Any, keep_masks: bool, desc: str, *args: Any) -> Any:
        calls[desc] = calls.get(desc, 0) + 1
        return features(self, dataset, keep_masks, desc, *args)

    out, err = io.StringIO(), io.StringIO()
    FeatureSource.features = counting_features
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        FeatureSource.features = features
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), **calls}


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny two-class run with the defaults, and one with every flag of ``RUN_FLAGS`` changed."""
    root = tmp_path_factory.mktemp("flag_runs")
    flags = [*tiny_flags(tiny_data, root / "base", classes=("fabric", "tile")), "--memory_size", "50"]
    base = _main(flags)
    other = _main([*tiny_flags(tiny_data, root / "other", classes=("fabric", "tile")), "--memory_size", "50", *RUN_FLAGS])
    assert base["code"] == 0 and other["code"] == 0, (base["err"], other["err"])
    for run, log_dir in ((base, root / "base"), (other, root / "other")):
        (run["dir"],) = [p for p in log_dir.iterdir() if p.is_dir()]
    return {"base": base, "other": other, "root": root}


def _final(run: dict) -> list[dict]:
    with open(run["dir"] / "final_results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@covers("use_router")
def test_use_router_routes_or_gives_the_true_task(runs: dict) -> None:
    assert all(row["routing_acc"] for row in _final(runs["base"]))
    assert not any(row["routing_acc"] for row in _final(runs["other"]))


@covers("eval_oracle", "run_diagnostics")
def test_oracle_results_and_diagnostics_are_written_when_asked(runs: dict) -> None:
    base, other = runs["base"]["dir"], runs["other"]["dir"]
    assert (base / "final_results_oracle.csv").is_file() and not (other / "final_results_oracle.csv").exists()
    assert not (base / "diagnostics").exists() and any((other / "diagnostics").glob("*.png"))


@covers("quiet", "experiment_name", "log_dir")
def test_console_and_folder_settings(runs: dict) -> None:
    base, other = runs["base"], runs["other"]
    assert len(base["out"].splitlines()) > 10 and len([ln for ln in other["out"].splitlines() if ln.strip()]) == 2
    assert base["dir"].name.startswith("moleflow_") and other["dir"].name.startswith("other_")
    assert base["dir"].parent == runs["root"] / "base" and other["dir"].parent == runs["root"] / "other"


@covers("cl_scenario")
def test_cl_scenario_forms_the_tasks(runs: dict) -> None:
    tasks = [json.loads((runs[r]["dir"] / "config.json").read_text())["tasks"] for r in ("base", "other")]
    assert tasks == [[["fabric"], ["tile"]], [["fabric", "tile"]]]


@covers("use_augmentation")
def test_augmentation_extracts_every_epoch(runs: dict) -> None:
    assert runs["base"]["task 0 features"] == 1 and runs["other"]["task 0 features"] == 2  # once per epoch


def _samples(tiny_data: Path, copies: int) -> list[Sample]:
    """The tiny data's fabric test images (good and defective, with masks), ``copies`` times over."""
    return load_class_split("folder", tiny_data, "fabric").test * copies


@covers("num_workers")
def test_num_workers_sets_the_decoding_processes(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    pool = decoding.shared_pool
    monkeypatch.setattr(decoding, "shared_pool", lambda workers: made.append(workers) or pool(workers))
    cfg = config(data_path=str(tiny_data), use_feature_cache=False, num_workers=1)
    extractor = build_backbone(cfg, CPU, weights="random")
    assert build_feature_source(config(num_workers=0, use_feature_cache=False), extractor, CPU, LOG).workers == \
        decoding.decode_workers(0) == 0 and decoding.decode_workers(40) == 16
    source = build_feature_source(cfg, extractor, CPU, LOG)
    dataset = build_dataset(cfg, _samples(tiny_data, 10))  # enough images for worker processes
    feats, count = source.features(dataset, keep_masks=True, desc="test")
    assert made == [1] and count.extracted == len(dataset)
    decoding.shutdown_pool()
    in_process = FeatureSource(extractor, CPU, cfg.batch_size, workers=0).features(dataset, True, "test")[0]
    assert torch.equal(feats.patches, in_process.patches) and torch.equal(feats.masks, in_process.masks)


@covers("use_feature_cache", "feature_cache", "feature_cache_max_gb")
def test_feature_cache_settings_say_where_and_how_much(tiny_data: Path, tmp_path: Path) -> None:
    base = config(data_path=str(tiny_data), feature_cache=str(tmp_path / "cache"))
    extractor = build_backbone(base, CPU, weights="random")
    dataset = build_dataset(base, _samples(tiny_data, 1))
    entries = {}
    for name, cfg in {"on": base, "off": apply_overrides(base, {"use_feature_cache": False}),
                      "small": apply_overrides(base, {"feature_cache": str(tmp_path / "small"),
                                                      "feature_cache_max_gb": 1e-12})}.items():
        source = build_feature_source(cfg, extractor, CPU, LOG)
        assert (source.cache is None) == (name == "off")
        source.features(dataset, keep_masks=True, desc="test")
        source.flush()  # a run's source writes in the background; the run flushes it at the end
        entries[name] = len(cache_entries(Path(cfg.feature_cache)))
    assert entries["on"] == len(dataset) and entries["small"] == 0  # written, then trimmed to the bound


@covers("amp", "tf32", "compile_flow")
def test_cuda_only_settings_warn_on_the_cpu(runs: dict) -> None:
    effective = json.loads((runs["other"]["dir"] / "config.json").read_text())["effective"]
    for flag in ("amp", "tf32", "compile_flow"):
        assert f"--{flag} has no effect on cpu" not in runs["base"]["err"]
        assert runs["other"]["err"].count(f"warning: --{flag} has no effect on cpu") == 1
        assert effective[flag] is False


@covers("resume")
def test_resume_continues_an_experiment_folder(runs: dict) -> None:
    finished = _main(["--resume", str(runs["base"]["dir"])])
    assert finished["code"] == 2 and "already finished its 2 task(s)" in finished["err"]
    with pytest.raises(ConfigError, match="is not a folder"):
        from moleflow.resume import resolve_resume
        resolve_resume(config(resume=str(runs["root"] / "missing")), {})


@covers("val_fraction")
def test_val_fraction_holds_out_images_that_set_the_thresholds(runs: dict) -> None:
    base, other = (json.loads((runs[r]["dir"] / "config.json").read_text()) for r in ("base", "other"))
    assert base["held_out_images"] == {"fabric": 1, "tile": 1} and other["held_out_images"] == {"fabric": 0, "tile": 0}
    assert all(row["f1_at_threshold"] and row["f1_max_test_picked"] for row in _final(runs["base"]))
    assert all(not row["f1_at_threshold"] and row["f1_max_test_picked"] for row in _final(runs["other"]))
    with open(runs["other"]["dir"] / "thresholds.csv", newline="") as handle:
        assert [row["threshold"] for row in csv.DictReader(handle)] == [""]  # 2-1: one task, no threshold


@covers("threshold_quantile")
def test_threshold_quantile_sets_the_threshold() -> None:
    from moleflow.evaluation.calibration import calibrate_task
    from moleflow.models.memory import PatchMemory
    thresholds = []
    for cfg in (BASE, config(threshold_quantile=0.5)):
        torch.manual_seed(0)
        model, router, memory = build_flow(cfg, D), build_router(cfg), PatchMemory()
        model.add_task()
        router.add_task(_features(0).router)
        memory.add_task(task_memory(model, _features(0), 0, score_settings(cfg), CPU))
        held = _features(3)  # ten held-out images
        thresholds.append(calibrate_task(model, memory, router, score_settings(cfg), CPU, 0, cfg.threshold_quantile,
                                         held, _features(0).router).threshold)
    assert thresholds[0] > thresholds[1]
    with pytest.raises(ConfigError, match="--threshold_quantile has no effect with --val_fraction 0"):
        parse_config(["--val_fraction", "0", "--threshold_quantile", "0.9"])


# ------------------------------------------------------------------------------ settings of the run itself

@covers("device")
def test_device_is_where_the_run_goes() -> None:
    assert runner_mod.resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert runner_mod.resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            runner_mod.resolve_device("cuda")


@covers("compile_ahead")
def test_compile_ahead_starts_the_child_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    started = []
    monkeypatch.setattr(CompileAhead, "start", lambda self, shape: started.append(self.config.compile_ahead))
    monkeypatch.setattr(fusion, "FUSED_DEVICES", ("cpu",))
    with fusion.fusion(True):
        for cfg in (config(compile_flow=True), config(compile_flow=True, compile_ahead=False)):
            CompileAhead(cfg, CPU, LOG).before_task(0, (4, 4, 4, D))
    assert started == [True]
    with pytest.raises(ConfigError, match="--compile_ahead has no effect with --no_compile_flow"):
        parse_config(["--no_compile_ahead"])


@covers("ablation_preset", "demo")
def test_preset_and_demo_set_their_groups() -> None:
    assert parse_config([])[0].use_dia and not parse_config(["--ablation_preset", "wo_dia"])[0].use_dia
    demo = parse_config(["--demo"])[0]
    assert all(getattr(demo, k) == v for k, v in DEMO_SETTINGS.items())
    assert parse_config([])[0].backbone_name != demo.backbone_name
