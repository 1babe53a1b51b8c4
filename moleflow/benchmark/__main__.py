"""``python -m moleflow.benchmark``: time the main configuration end to end and against its limits.

See ``--help`` and ``moleflow/benchmark/__init__.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional

import torch

from moleflow.benchmark.limits import measure_limits
from moleflow.benchmark.synthetic import SyntheticSpec, generate_synthetic_dataset
from moleflow.benchmark.timing import timed_run
from moleflow.build import resolve_device
from moleflow.config.ablation import DEMO_SETTINGS, PRESETS, AblationConfig, apply_overrides, config_fields
from moleflow.data import generate_demo_dataset, list_classes

RANDOM_WEIGHTS_NOTE = ("random backbone weights: the throughputs are those of the real network, but the metrics of "
                       "this run measure nothing (use --weights pretrained with a backbone whose weights are here)")
GOALS = {"run_total_s_max": 240.0, "e2e_images_per_s_min": 2500.0, "training_fraction_of_flow_limit_min": 0.8,
         "gpu_peak_gib_max": 20.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moleflow.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("synthetic", "demo", "folder"), default="synthetic",
                   help="synthetic: the MVTec-size dataset (generated if absent); demo: the embedded demo data; "
                        "folder: an existing MVTec-layout dataset at --data_path (default: synthetic)")
    p.add_argument("--data_path", default="./data/moleflow_bench", help="dataset folder")
    p.add_argument("--dataset", default=None, help="layout for --data folder: mvtec, mpdd, folder, visa")
    p.add_argument("--classes", type=int, default=15, help="synthetic: number of classes (default 15)")
    p.add_argument("--n_train", type=int, default=240, help="synthetic: training images per class")
    p.add_argument("--n_test", type=int, default=115, help="synthetic: test images per class")
    p.add_argument("--min_px", type=int, default=700, help="synthetic: smallest image side")
    p.add_argument("--max_px", type=int, default=1024, help="synthetic: largest image side")
    p.add_argument("--tasks", type=int, default=None, help="use only the first N classes")
    p.add_argument("--weights", choices=("pretrained", "random"), required=True,
                   help="backbone weights; 'random' gives valid speed figures but meaningless metrics")
    p.add_argument("--demo_settings", action="store_true", help="apply the --demo sizes (efficientnet_lite0, D=256 ...)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS),
                   help="an --ablation_preset applied before --set (default: full, the main configuration)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an AblationConfig setting, e.g. --set num_epochs=60 (repeatable)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast + channels-last backbone on CUDA")
    p.add_argument("--tf32", action="store_true", help="TF32 matrix products in the flow on CUDA")
    p.add_argument("--compile_flow", action="store_true",
                   help="fuse the flow's element-wise work with torch.compile on CUDA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: run once per seed (metric noise)")
    p.add_argument("--skip_limits", action="store_true", help="do not measure the backbone/flow limits")
    p.add_argument("--skip_run", action="store_true", help="measure the limits only")
    p.add_argument("--quick_limits", action="store_true", help="one step per limit (tests)")
    p.add_argument("--e2e_images", type=int, default=768, help="images in the end-to-end inference set")
    p.add_argument("--e2e_batch", type=int, default=256,
                   help="images per end-to-end inference batch, mixed over classes; the flow runs once per routed expert "
                        "present in a batch (default 256)")
    p.add_argument("--json", default=None, help="write the results here (default: <data_path>/../benchmark_<time>.json)")
    p.add_argument("--log_dir", default=None,
                   help="the runs' experiment folders go here (default: benchmark_runs/ beside the JSON)")
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'before', 'after')")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--feature_cache", default=None, metavar="DIR",
                   help="the runs read and store backbone features in this feature cache (default: no cache, every "
                        "image decoded and extracted)")
    p.add_argument("--warm_cache", action="store_true",
                   help="empty the feature cache (--feature_cache, default: feature_cache/ beside --data_path), run "
                        "cold, then again warm; report both")
    return p


def _parse_value(name: str, text: str) -> Any:
    kind = typing.get_type_hints(AblationConfig)[name]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"error: --set {name}={text}: use true or false")
        return text.lower() in ("true", "1")
    if kind == list[str]:
        return text.split(",")
    if kind == list[int]:
        try:
            return [int(item) for item in text.split(",")]
        except ValueError:
            raise SystemExit(f"error: --set {name}={text}: use comma-separated integers, e.g. {name}=8,16") from None
    base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
    return base(text)


def resolve_config(args: argparse.Namespace, classes: list[str], dataset: str, log_dir: Path) -> AblationConfig:
    """Main configuration + demo sizes (if asked) + the preset + the data + ``--set`` overrides."""
    config = AblationConfig()
    if args.demo_settings:
        config = apply_overrides(config, DEMO_SETTINGS)
    config = apply_overrides(config, {**PRESETS[args.preset], "ablation_preset": args.preset})
    overrides: dict[str, Any] = {"dataset": dataset, "data_path": str(args.data_path), "task_classes": classes,
                                 "device": args.device, "amp": bool(args.amp), "tf32": bool(args.tf32),
                                 "compile_flow": bool(args.compile_flow), "log_dir": str(log_dir),
                                 "experiment_name": "benchmark", "use_feature_cache": bool(args.feature_cache)}
    if args.feature_cache:
        overrides["feature_cache"] = str(args.feature_cache)
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"error: --set {item}: use KEY=VALUE")
        key, value = item.split("=", 1)
        if key not in config_fields():
            raise SystemExit(f"error: --set {key}: not an AblationConfig setting")
        overrides[key] = _parse_value(key, value)
    return apply_overrides(config, overrides).validate()


def prepare_data(args: argparse.Namespace) -> tuple[list[str], str, dict]:
    root = Path(args.data_path)
    started = time.perf_counter()
    if args.data == "synthetic":
        spec = SyntheticSpec(args.classes, args.n_train, args.n_test, args.min_px, args.max_px)
        classes, dataset, info = generate_synthetic_dataset(root, spec), "folder", dataclasses.asdict(spec)
    elif args.data == "demo":
        classes, dataset, info = generate_demo_dataset(root, seed=0), "folder", {"demo": True}
    else:
        dataset = args.dataset or "folder"
        classes, info = list_classes(dataset, root), {}
    info.update({"path": str(root), "prepare_s": time.perf_counter() - started})
    if args.tasks:
        classes = classes[:args.tasks]
    return classes, dataset, info


def ratios(result: dict) -> dict[str, Optional[float]]:
    """Each of our figures over its limit (None where a figure or limit is missing)."""
    limits, run = result.get("limits"), result.get("run")
    if not limits or not run:
        return {}
    ref = limits["reference_flow"]
    ref32 = ref["fp32"]
    backbone = limits.get("backbone_bf16_channels_last_images_per_s") if result["speed_settings"]["amp"] else None
    backbone = backbone or limits["backbone_fp32_images_per_s"]
    serial = 1.0 / (1.0 / backbone + 1.0 / ref32["infer_images_per_s"])
    train = run["training"]["images_per_s"]
    steady = run["training"].get("from_third_task_images_per_s")
    same = ref.get("tf32", ref32) if result["speed_settings"]["tf32"] else ref32
    e2e = run["inference_e2e"]["images_per_s"]
    return {
        "training_over_flow_train_limit_fp32": train / ref32["train_images_per_s"],
        "training_over_flow_train_limit_same_precision": train / same["train_images_per_s"],
        "training_from_third_task_over_flow_train_limit_same_precision":
            steady / same["train_images_per_s"] if steady else None,
        "e2e_over_serial_limit_backbone_plus_flow_fp32": e2e / serial,
        "e2e_over_flow_infer_limit_fp32": e2e / ref32["infer_images_per_s"],
        "decode_extraction_over_backbone_limit": (run["decode_extraction_images_per_s"] or 0.0) / backbone,
    }


def goals(result: dict) -> dict[str, Any]:
    run, rat = result.get("run"), result.get("ratios") or {}
    if not run:
        return {}
    gpu = run["memory"].get("gpu_peak_reserved_gib")
    ahead = run.get("compile_ahead")
    if gpu is not None and ahead:  # the compile-ahead child's GPU memory, counted as if held at the run's peak
        gpu += ahead["gpu_peak_reserved_gib"]
    full_size = result["config"]["num_epochs"] == 60 and len(run["tasks"]) == 15
    return {  # the wall-time goal is about 15 tasks x 60 epochs; other sizes are "n/a" (None)
        "run_total_s": [run["run_total_s"], run["run_total_s"] <= GOALS["run_total_s_max"] if full_size else None],
        "e2e_images_per_s": [run["inference_e2e"]["images_per_s"],
                             run["inference_e2e"]["images_per_s"] >= GOALS["e2e_images_per_s_min"]],
        # against the reference flow at the precision the run used (TF32 run: TF32 reference)
        "training_over_flow_limit": [rat.get("training_over_flow_train_limit_same_precision"),
                                     (rat.get("training_over_flow_train_limit_same_precision") or 0)
                                     >= GOALS["training_fraction_of_flow_limit_min"]],
        "gpu_peak_reserved_gib": [gpu, gpu is not None and gpu < GOALS["gpu_peak_gib_max"]],
    }


def summary_lines(result: dict) -> list[str]:
    lines = [f"device {result['device']} | torch {result['torch']} | {result['label']}"]
    if result.get("backbone_weights_note"):
        lines.append(f"NOTE: {result['backbone_weights_note']}")
    limits = result.get("limits")
    if limits:
        ref = limits["reference_flow"]
        lines.append(f"limits: backbone fp32 {limits['backbone_fp32_images_per_s']:.0f} img/s"
                     + (f", bf16+cl {limits['backbone_bf16_channels_last_images_per_s']:.0f}"
                        if "backbone_bf16_channels_last_images_per_s" in limits else "")
                     + f" | ref flow fp32 train {ref['fp32']['train_images_per_s']:.0f} infer "
                       f"{ref['fp32']['infer_images_per_s']:.0f}"
                     + (f" | tf32 train {ref['tf32']['train_images_per_s']:.0f} infer {ref['tf32']['infer_images_per_s']:.0f}"
                        if "tf32" in ref else ""))
        for key, value in limits["our_flow"].items():
            lines.append(f"our flow alone {key}: " + ", ".join(f"{k} {v:.0f}" for k, v in value.items()))
        for key, value in limits.get("our_flow_task1_step_diagnostics", {}).items():
            lines.append(f"our flow task-1 step, eager vs CUDA graph, {key}: "
                         + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()))
    run = result.get("run")
    if run:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in run["phases_s"].items())
        lines.append(f"run total {run['run_total_s']:.1f}s ({phases})")
        cache = run["feature_cache"]
        lines.append(f"decode + extraction {run['decode_extraction_s']:.2f}s = {_rate(run['decode_extraction_images_per_s'])}"
                     f" img/s ({cache['images_from_cache']} image(s) from the feature cache {cache['folder']}, "
                     f"{cache['images_extracted']} decoded and extracted)")
        lines.append(f"training {run['training']['images_per_s']:.0f} img/s | decode {_rate(run['decode_images_per_s'])} "
                     f"img/s | extraction {_rate(run['extraction_images_per_s'])} img/s | e2e inference "
                     f"{run['inference_e2e']['images_per_s']:.0f} img/s (x{run['inference_e2e']['last_over_first_ms_per_image']:.2f}"
                     f" ms/img from 1 to {len(run['tasks'])} tasks)")
        pred = run.get("predict")
        if pred:
            lines.append(f"predict after {pred['tasks']} tasks (batch {pred['batch']}): {pred['decoded_images_per_s']:.0f} "
                         f"img/s from decoded tensors, {pred['files_images_per_s']:.0f} img/s from files (maps at "
                         "each image's resolution)")
        steady = run["training"].get("from_third_task_images_per_s")
        if steady:
            lines.append(f"training from the third task on (nothing compiled there): {steady:.0f} img/s; per task, s: "
                         + " ".join(f"{t['seconds']:.1f}" for t in run["training"]["per_task"]))
        last = run["inference_e2e"]["per_task_count"][-1]
        if "stage_ms_per_image" in last:
            lines.append(f"e2e stages after {last['tasks']} tasks, ms/image: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in last["stage_ms_per_image"].items()))
        lines.append("memory " + ", ".join(f"{k} {v:.2f}" for k, v in run["memory"].items()))
        ahead = run.get("compile_ahead")
        if ahead:
            lines.append(f"compile-ahead child: {ahead['seconds']:.1f} s, GPU peak reserved "
                         f"{ahead['gpu_peak_reserved_gib']:.2f} GiB; the run waited {ahead['waited_s']:.1f} s for it")
        if run.get("compile_cache"):
            lines.append("compile caches: " + ", ".join(f"{k} {v}" for k, v in run["compile_cache"].items()))
        lines.append(f"parameters: shared {run['parameters']['shared']:,}, per task "
                     f"{run['parameters']['per_task'][0]:,}, total {run['parameters']['total_after_each_task'][-1]:,}")
    warm = result.get("warm_cache")
    if warm:
        lines.append(f"warm cache: run total {warm['cold_run_total_s']:.1f}s cold -> {warm['warm_run_total_s']:.1f}s warm "
                     f"({100 * warm['run_total_saved_fraction']:.1f}% shorter), decode + extraction "
                     f"{warm['cold_decode_extraction_s']:.2f}s -> {warm['warm_decode_extraction_s']:.2f}s, final "
                     f"results identical: {warm['final_results_identical']}")
    for seed, m in (result.get("final_routed_mean_by_seed") or {}).items():
        lines.append(f"final routed mean (seed {seed}): " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    for key, value in (result.get("ratios") or {}).items():
        lines.append(f"ratio {key}: {value:.3f}" if value is not None else f"ratio {key}: n/a")
    for key, (value, ok) in (result.get("goals") or {}).items():
        verdict = "n/a (needs 15 tasks x 60 epochs)" if ok is None else ("met" if ok else "NOT met")
        lines.append(f"goal {key}: {value if value is None else round(value, 3)} -> {verdict}")
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.warm_cache and not args.feature_cache:
        args.feature_cache = str(Path(args.data_path).parent / "feature_cache")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    classes, dataset, data_info = prepare_data(args)
    path = Path(args.json) if args.json else Path(args.data_path).parent / f"benchmark_{time.strftime('%Y%m%d_%H%M%S')}.json"
    config = resolve_config(args, classes, dataset, Path(args.log_dir) if args.log_dir else path.parent / "benchmark_runs")
    result: dict[str, Any] = {
        "label": args.label, "command": "python -m moleflow.benchmark " + shlex.join(argv or sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "dataset": data_info,
        "backbone": config.backbone_name, "backbone_weights": args.weights,
        "backbone_weights_note": RANDOM_WEIGHTS_NOTE if args.weights == "random" else "",
        "speed_settings": {"amp": bool(args.amp) and cuda, "tf32": bool(args.tf32) and cuda,
                           "batch_size": config.batch_size, "num_workers": config.num_workers,
                           "cuda_graphs": config.cuda_graphs and cuda, "compile_flow": config.compile_flow and cuda},
        "config": config.to_dict(), "goals_targets": GOALS,
    }
    print(f"benchmark: {len(classes)} classes, backbone {config.backbone_name} ({args.weights} weights), device {device}",
          flush=True)
    if args.weights == "random":
        print(f"NOTE: {RANDOM_WEIGHTS_NOTE}", flush=True)
    if not args.skip_limits:
        result["limits"] = measure_limits(device, config, quick=args.quick_limits)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))  # the limits survive a run that is stopped
    if not args.skip_run:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [config.seed]
        for seed in seeds:
            seeded = dataclasses.replace(config, seed=seed)
            if args.warm_cache:
                run, result["warm_cache"] = warm_cache_runs(seeded, args)
            else:
                run = _timed_run(seeded, args)
            result.setdefault("run", run)
            result.setdefault("final_routed_mean_by_seed", {})[seed] = run["metrics"]["final_routed_mean"]
            if run["metrics"]["final_oracle_mean"] is not None:
                result.setdefault("final_oracle_mean_by_seed", {})[seed] = run["metrics"]["final_oracle_mean"]
    result["ratios"] = ratios(result)
    result["goals"] = goals(result)
    for line in summary_lines(result):
        print(line)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
    return result


def _rate(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _timed_run(config: AblationConfig, args: argparse.Namespace) -> dict:
    return timed_run(config, args.weights, e2e_images=args.e2e_images, e2e_batch=args.e2e_batch,
                     progress=args.progress, echo=lambda line: print(line, flush=True))


def warm_cache_runs(config: AblationConfig, args: argparse.Namespace) -> tuple[dict, dict]:
    """``--warm_cache``: the run with its feature cache folder emptied first (cold), then again (warm)."""
    from moleflow.cache import clear
    clear(Path(config.feature_cache))
    runs = [_timed_run(config, args) for _ in ("cold", "warm")]
    cold, warm = runs
    files = [(Path(r["experiment"]) / "final_results.csv").read_bytes() for r in runs]
    return cold, {"cold_run_total_s": cold["run_total_s"], "warm_run_total_s": warm["run_total_s"],
                  "run_total_saved_fraction": 1.0 - warm["run_total_s"] / cold["run_total_s"],
                  "cold_decode_extraction_s": cold["decode_extraction_s"],
                  "warm_decode_extraction_s": warm["decode_extraction_s"],
                  "cold_decode_extraction_images_per_s": cold["decode_extraction_images_per_s"],
                  "warm_images_from_cache": warm["feature_cache"]["images_from_cache"],
                  "final_results_identical": files[0] == files[1], "warm_run": warm}


if __name__ == "__main__":
    main()
