"""AblationConfig, presets and the generated CLI parser."""

from __future__ import annotations

import pytest

from moleflow.config.ablation import MVTEC_CLASSES, PRESETS, AblationConfig, ConfigError, config_fields
from moleflow.config.cli import build_parser, parse_config


def test_defaults_are_the_main_configuration():
    cfg = AblationConfig()
    assert cfg.dataset == "mvtec" and cfg.task_classes == MVTEC_CLASSES and cfg.cl_scenario == "1-1"
    assert (cfg.backbone_name, cfg.img_size, cfg.resize_mode) == ("wide_resnet50_2", 224, "crop")
    # ours over the paper (docs/accuracy.md): 3x3-mean features of the stride-4/8/16 stages concatenated,
    # D = the backbone's width up to 768 (768 for wide_resnet50_2), the flow fused with a per-task memory
    assert (cfg.feature_pooling, cfg.feature_strides, cfg.feature_dim) == ("avg", [4, 8, 16], 0)
    assert (cfg.anomaly_score, cfg.memory_weight, cfg.memory_size) == ("fused", 0.7, 10000)
    assert (cfg.num_coupling_layers, cfg.dia_n_blocks, cfg.lora_rank) == (6, 2, 64)
    assert (cfg.num_epochs, cfg.lr, cfg.batch_size) == (60, 3e-4, 16)
    assert (cfg.use_tail_aware_loss, cfg.tail_weight, cfg.tail_top_k_ratio, cfg.lambda_logdet) == (True, 0.7, 0.02, 1e-4)
    assert (cfg.score_aggregation_mode, cfg.score_aggregation_top_k) == ("top_k", 3)
    assert (cfg.scale_context_kernel, cfg.spatial_context_kernel) == (5, 3)
    assert all([cfg.use_lora, cfg.use_dia, cfg.use_whitening_adapter, cfg.use_task_adapter, cfg.use_router,
                cfg.use_mahalanobis, cfg.use_pos_embed, cfg.use_spatial_context, cfg.use_scale_context])
    assert (cfg.weight_decay, cfg.grad_clip, cfg.warmup_epochs, cfg.optimizer) == (0.01, 0.5, 2, "adamw")
    assert not cfg.enable_slow_stage and (cfg.slow_blocks_k, cfg.slow_lr_ratio) == (2, 0.2)
    assert parse_config([])[0] == cfg.validate()


def test_paper_main_preset_is_the_papers_main_configuration():
    cfg, _ = parse_config(["--ablation_preset", "paper_main"])
    assert (cfg.feature_pooling, cfg.feature_strides, cfg.feature_dim) == ("unfold", [8, 16], 768)
    assert cfg.anomaly_score == "flow" and cfg.resize_mode == "crop"
    rest = {k: v for k, v in cfg.to_dict().items()
            if k not in ("feature_pooling", "feature_strides", "feature_dim", "anomaly_score", "ablation_preset")}
    assert rest == {k: v for k, v in AblationConfig().to_dict().items() if k in rest}


def test_memory_flags_need_the_memory():
    with pytest.raises(ConfigError, match="--memory_weight needs --anomaly_score fused"):
        parse_config(["--anomaly_score", "flow", "--memory_weight", "0.5"])
    with pytest.raises(ConfigError, match="--memory_size needs --anomaly_score memory or --anomaly_score fused"):
        parse_config(["--anomaly_score", "flow", "--memory_size", "100"])
    cfg, _ = parse_config(["--anomaly_score", "memory", "--memory_size", "100"])
    assert cfg.memory_size == 100
    cfg, _ = parse_config(["--ablation_preset", "wo_memory", "--memory_weight", "0.5"])  # moot under the preset
    assert cfg.anomaly_score == "flow"


def test_every_preset_key_and_flag_is_a_field():
    fields = set(config_fields())
    for preset in PRESETS.values():
        assert set(preset) <= fields
    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.dest in fields, action.dest
    assert {"full", "wo_lora", "wo_router", "wo_adapter", "wo_pos_embed", "wo_dia", "wo_spatial_context",
            "wo_scale_context", "wo_tail_loss", "wo_router_adapter", "lora_only", "baseline_nf"} <= set(PRESETS)


def test_flag_pairs_and_precedence():
    cfg, _ = parse_config(["--no_lora", "--no_router", "--lora_rank", "8"][:2])
    assert not cfg.use_lora and not cfg.use_router
    cfg, _ = parse_config(["--ablation_preset", "wo_dia"])
    assert not cfg.use_dia and cfg.ablation_preset == "wo_dia"
    cfg, _ = parse_config(["--ablation_preset", "wo_dia", "--use_dia"])  # explicit flag wins over preset
    assert cfg.use_dia
    cfg, _ = parse_config(["--ablation_preset", "baseline_nf"])
    assert not any([cfg.use_lora, cfg.use_router, cfg.use_task_adapter, cfg.use_pos_embed, cfg.use_dia,
                    cfg.use_spatial_context, cfg.use_scale_context, cfg.freeze_base])
    cfg, _ = parse_config(["--task_classes", "a", "b", "--num_epochs", "3", "--lr", "0.001"])
    assert cfg.task_classes == ["a", "b"] and cfg.num_epochs == 3 and cfg.lr == 0.001


def test_demo_settings_below_preset_and_flags():
    cfg, _ = parse_config(["--demo"])
    assert cfg.backbone_name == "efficientnet_lite0" and cfg.dataset == "folder" and len(cfg.task_classes) >= 3
    cfg, _ = parse_config(["--demo", "--num_epochs", "1"])
    assert cfg.num_epochs == 1
    with pytest.raises(ConfigError, match="--demo"):
        parse_config(["--demo", "--data_path", "/somewhere"])


@pytest.mark.parametrize("argv,needle", [
    (["--no_lora", "--lora_rank", "8"], "--lora_rank has no effect with --no_lora"),
    (["--no_dia", "--dia_n_blocks", "3"], "--dia_n_blocks"),
    (["--no_router", "--use_mahalanobis"], "--use_mahalanobis"),
    (["--score_aggregation_mode", "max", "--score_aggregation_top_k", "5"], "top_k"),
    (["--slow_blocks_k", "3"], "--enable_slow_stage"),
    (["--ablation_preset", "nope"], "wo_lora"),
    (["--feature_dim", "30"], "multiple of 4"),
    (["--experiment_name", "../escape"], "plain folder name"),
    (["--experiment_name", "/abs"], "plain folder name"),
    (["--task_classes", "a", "a"], "repeats"),
    (["--dataset", "kitti"], "mvtec, visa, mpdd, folder"),
])
def test_bad_settings_are_one_line_errors(argv, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_mutually_exclusive_pair_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["--use_lora", "--no_lora"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "not allowed with" in err and len(err.splitlines()) == 1

