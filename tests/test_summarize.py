"""python -m moleflow.summarize on hand-made experiment folders: grouping by settings, mean ± sample
std of the class results, forgetting and BWT, oracle results, refusals and where the files go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, repo_env
from moleflow import summarize

COLUMNS = ["task_id", "class_name", "routing_acc", "img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro"]
METRICS = COLUMNS[2:]


def write_run(folder: Path, seed: int = 0, preset: str = "full", offset: float = 0.0,
              settings: Optional[dict[str, Any]] = None, continual: Optional[dict[str, tuple]] = None,
              oracle_offset: Optional[float] = 0.0, router: bool = True) -> Path:
    """An experiment folder as run_moleflow.py writes it, with two classes (leather, grid).

    ``offset`` is added to img_auroc of both classes; ``continual`` maps metric -> (final_mean,
    forgetting, bwt); ``oracle_offset`` None writes no final_results_oracle.csv.
    """
    folder.mkdir(parents=True)
    config = {"dataset": "mvtec", "task_classes": ["leather", "grid"], "lr": 0.0003, "use_router": router, "use_lora": True,
              "ablation_preset": preset, "seed": seed, "experiment_name": folder.name,
              "log_dir": str(folder.parent), "device": "auto", "resume": None, **(settings or {})}
    (folder / "config.json").write_text(json.dumps(
        {"config": config, "tasks": [["leather"], ["grid"]], "command_line": f"run_moleflow.py --seed {seed}",
         "effective": {"device": "cpu", "amp": False, "tf32": False, "compile_flow": False}}))

    def results(name: str, extra: float, routing: bool) -> None:
        rows = [[0, "leather", 1.0, 0.90 + extra, 0.95, 0.80, 0.50, 0.85],
                [1, "grid", 1.0, 0.80 + extra, 0.91, 0.70, 0.30, 0.75]]
        for row in rows:
            row[2] = row[2] if routing else ""
        mean = ["mean", "mean", *(np.mean([r[k] for r in rows]) if routing or k > 2 else "" for k in range(2, 8))]
        pd.DataFrame(rows + [mean], columns=COLUMNS).to_csv(folder / name, index=False)

    results("final_results.csv", offset, router)
    if oracle_offset is not None:
        results("final_results_oracle.csv", oracle_offset, False)
    continual = continual or {m: (0.9, 0.01, -0.01) for m in METRICS if router or m != "routing_acc"}
    pd.DataFrame([[m, *v] for m, v in continual.items()],
                 columns=["metric", "final_mean", "forgetting", "bwt"]).to_csv(folder / "continual_summary.csv",
                                                                                 index=False)
    return folder


def run_main(*args: str) -> int:
    return summarize.main([*args])


def only(pattern: str, where: Path) -> Path:
    found = sorted(where.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_two_seeds_of_a_preset_averaged_other_preset_kept_apart(tmp_path: Path, capsys) -> None:
    a = write_run(tmp_path / "full_s0", seed=0, offset=0.0)
    b = write_run(tmp_path / "full_s1", seed=1, offset=0.04)
    c = write_run(tmp_path / "wo_lora_s0", seed=0, preset="wo_lora", offset=0.5,
                  settings={"use_lora": False})
    assert run_main(str(a), str(b), str(c), "--out", str(tmp_path / "out" / "s.csv")) == 0
    classes = pd.read_csv(tmp_path / "out" / "s.csv")
    assert list(classes["group"].unique()) == ["full", "wo_lora"]
    full = classes[(classes["group"] == "full") & (classes["evaluation"] == "routed")].set_index("class_name")
    assert list(full.index) == ["leather", "grid", "mean"]
    assert (full["n_runs"] == 2).all()
    assert full.loc["leather", "img_auroc_mean"] == pytest.approx(0.92, abs=1e-12)
    assert full.loc["leather", "img_auroc_std"] == pytest.approx(0.04 / np.sqrt(2), abs=1e-12)  # ddof = 1
    assert full.loc["mean", "img_auroc_mean"] == pytest.approx(0.87, abs=1e-12)
    assert full.loc["grid", "pixel_ap_std"] == pytest.approx(0.0, abs=1e-12)
    wo_lora = classes[(classes["group"] == "wo_lora") & (classes["evaluation"] == "routed")].set_index("class_name")
    assert (wo_lora["n_runs"] == 1).all() and np.isnan(wo_lora.loc["mean", "img_auroc_std"])
    assert wo_lora.loc["leather", "img_auroc_mean"] == pytest.approx(1.40, abs=1e-12)  # not mixed into full
    groups = pd.read_csv(tmp_path / "out" / "s_groups.csv").set_index("group")
    assert groups.loc["full", "seeds"] == "0 1" and groups.loc["full", "runs"] == "full_s0;full_s1"
    printed = capsys.readouterr().out
    assert "use_lora: True (full); False (wo_lora)" in printed
    assert "87.00 ± 2.83" in printed  # the side-by-side table, percent


def test_a_differing_setting_splits_and_names_the_group(tmp_path: Path, capsys) -> None:
    runs = [write_run(tmp_path / "a", seed=0), write_run(tmp_path / "b", seed=1, settings={"lr": 0.001}),
            write_run(tmp_path / "c", seed=2, settings={"lr": 0.001})]
    assert run_main(*map(str, runs), "--out", str(tmp_path / "s.csv")) == 0
    groups = pd.read_csv(tmp_path / "s_groups.csv")
    assert list(groups["group"]) == ["full lr=0.0003", "full lr=0.001"]
    assert list(groups["n_runs"]) == [1, 2] and list(groups["settings"]) == ["lr=0.0003", "lr=0.001"]
    out = capsys.readouterr().out
    assert "settings that differ between groups:" in out and "lr: 0.0003 (full lr=0.0003); 0.001 (full lr=0.001)" in out


def test_bookkeeping_fields_do_not_split(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "x" / "a", seed=0),
            write_run(tmp_path / "y" / "b", seed=7, settings={"device": "cuda", "quiet": True, "num_workers": 4,
                                                             "resume": "logs/old"})]
    assert run_main(*map(str, runs), "--out", str(tmp_path / "s.csv")) == 0
    groups = pd.read_csv(tmp_path / "s_groups.csv")
    assert list(groups["group"]) == ["full"] and groups.loc[0, "seeds"] == "0 7"


def test_older_run_without_a_key_is_grouped_by_what_it_has(tmp_path: Path, capsys) -> None:
    new = [write_run(tmp_path / f"new{s}", seed=s, settings={"memory_weight": 0.7}) for s in (0, 1)]
    old = [write_run(tmp_path / f"old{s}", seed=s) for s in (0, 1)]  # config.json lacks memory_weight
    bare = tmp_path / "bare"
    write_run(bare, seed=3)
    payload = json.loads((bare / "config.json").read_text())
    payload["config"] = {"seed": 3, "lr": 0.0003}  # an old run: no preset, few fields, no effective
    del payload["effective"], payload["tasks"]
    (bare / "config.json").write_text(json.dumps(payload))
    assert run_main(*map(str, [*new, *old, bare]), "--out", str(tmp_path / "s.csv")) == 0
    groups = pd.read_csv(tmp_path / "s_groups.csv").set_index("group")
    assert list(groups["n_runs"]) == [2, 2, 1]
    assert "memory_weight=0.7" in groups.index[0] and "memory_weight=unknown" in groups.index[1]
    assert groups.index[2] == "preset unknown"  # the only group without a recorded preset
    assert "memory_weight: 0.7" in capsys.readouterr().out


def test_forgetting_and_bwt_mean_and_sample_std(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", seed=0, continual={"img_auroc": (0.90, 0.02, -0.01),
                                                     "pixel_auroc": (0.95, 0.00, 0.00),
                                                     "routing_acc": (1.0, "", "")})  # one task: FM, BWT n/a
    b = write_run(tmp_path / "b", seed=1, continual={"img_auroc": (0.92, 0.06, -0.05),
                                                     "pixel_auroc": (0.97, 0.01, 0.02),
                                                     "routing_acc": (1.0, "", "")})
    assert run_main(str(a), str(b), "--out", str(tmp_path / "s.csv")) == 0
    table = pd.read_csv(tmp_path / "s_continual.csv").set_index("metric")
    assert table.loc["img_auroc", "forgetting_mean"] == pytest.approx(0.04, abs=1e-12)
    assert table.loc["img_auroc", "forgetting_std"] == pytest.approx(0.04 / np.sqrt(2), abs=1e-12)
    assert table.loc["img_auroc", "bwt_mean"] == pytest.approx(-0.03, abs=1e-12)
    assert table.loc["img_auroc", "bwt_std"] == pytest.approx(0.04 / np.sqrt(2), abs=1e-12)
    assert table.loc["img_auroc", "final_mean_mean"] == pytest.approx(0.91, abs=1e-12)
    assert table.loc["pixel_auroc", "bwt_mean"] == pytest.approx(0.01, abs=1e-12)
    assert table.loc["pixel_auroc", "bwt_std"] == pytest.approx(0.02 / np.sqrt(2), abs=1e-12)
    assert np.isnan(table.loc["routing_acc", "forgetting_mean"]) and np.isnan(table.loc["aupro", "bwt_mean"])
    assert (table["n_runs"] == 2).all()
    groups = pd.read_csv(tmp_path / "s_groups.csv")
    assert groups.loc[0, "forgetting_img_auroc_mean"] == pytest.approx(0.04, abs=1e-12)
    assert groups.loc[0, "bwt_pixel_auroc_std"] == pytest.approx(0.02 / np.sqrt(2), abs=1e-12)
    md = (tmp_path / "s_groups.md").read_text()
    assert "forgetting FM" in md and "| full | 2 | n/a | 4.00 ± 2.83 |" in md


def test_oracle_results_and_routing_not_measured(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", seed=0, oracle_offset=0.05)
    b = write_run(tmp_path / "b", seed=1, oracle_offset=0.07)
    c = write_run(tmp_path / "c", seed=2, oracle_offset=None)  # --no_eval_oracle: routed results only
    r = write_run(tmp_path / "r", seed=0, preset="wo_router", router=False, settings={"use_router": False})
    assert run_main(*map(str, (a, b, c, r)), "--out", str(tmp_path / "s.csv")) == 0
    classes = pd.read_csv(tmp_path / "s.csv")
    oracle = classes[(classes["group"] == "full") & (classes["evaluation"] == "oracle")].set_index("class_name")
    assert (oracle["n_runs"] == 2).all()
    assert oracle.loc["leather", "img_auroc_mean"] == pytest.approx(0.96, abs=1e-12)
    assert oracle.loc["leather", "img_auroc_std"] == pytest.approx(0.02 / np.sqrt(2), abs=1e-12)
    assert oracle["routing_acc_mean"].isna().all()  # no routing with the true task given
    groups = pd.read_csv(tmp_path / "s_groups.csv").set_index("group")
    assert groups.loc["full", "n_runs"] == 3 and groups.loc["full", "n_oracle"] == 2
    assert groups.loc["full", "oracle_img_auroc_mean"] == pytest.approx(0.91, abs=1e-12)
    assert "oracle_routing_acc_mean" not in groups.columns
    assert np.isnan(groups.loc["wo_router", "routing_acc_mean"])  # routing n/a, other metrics there
    assert groups.loc["wo_router", "img_auroc_mean"] == pytest.approx(0.85, abs=1e-12)
    assert np.isnan(groups.loc["wo_router", "forgetting_routing_acc_mean"])
    assert "| wo_router | 1 | n/a | 85.00 |" in (tmp_path / "s_groups.md").read_text()


def test_a_folder_given_twice_is_refused(tmp_path: Path, capsys) -> None:
    a = write_run(tmp_path / "logs" / "a", seed=0)
    write_run(tmp_path / "logs" / "b", seed=1)
    (tmp_path / "link").symlink_to(tmp_path / "logs")
    for again in (str(tmp_path / "logs" / "." / "a"), str(tmp_path / "link" / "a")):
        assert run_main(str(a), str(tmp_path / "logs" / "b"), again) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "given twice" in err[0] and str(a.resolve()) in err[0]
    assert not list((tmp_path / "logs").glob("summary_*"))


def test_files_go_next_to_the_runs_not_into_the_cwd(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    runs = [write_run(logs / f"full_s{s}_20260101_000000", seed=s) for s in (0, 1)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = repo_env()
    for _ in range(2):  # a second summary of the same second does not overwrite the first
        done = subprocess.run([sys.executable, "-m", "moleflow.summarize", *map(str, runs)], cwd=elsewhere,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert list(elsewhere.iterdir()) == []
    assert len(list(logs.glob("summary_*_groups.md"))) == 2
    first = sorted(logs.glob("summary_2*.csv"))[0]
    assert first.name.count("_") == 2  # summary_<date>_<time>.csv
    for suffix in ("_continual.csv", "_groups.csv", "_groups.md"):
        assert first.with_name(first.stem + suffix).is_file()
    assert str(first) in done.stdout or str(logs) in done.stdout
    out_dir = tmp_path / "chosen"
    assert run_main(*map(str, runs), "--out", str(out_dir) + os.sep) == 0  # --out a folder
    only("summary_*_groups.csv", out_dir)


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    a = write_run(tmp_path / "run_a", seed=0)
    (tmp_path / "empty").mkdir()
    env = repo_env()
    for broken, missing in ((tmp_path / "empty", "config.json"), (tmp_path / "nocont", "continual_summary.csv")):
        if missing == "continual_summary.csv":
            write_run(broken, seed=1)
            (broken / missing).unlink()
        done = subprocess.run([sys.executable, "-m", "moleflow.summarize", str(a), str(broken)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and missing in lines[0] and broken.name in lines[0], lines
    assert not list(tmp_path.glob("summary_*"))


def test_runs_of_one_group_with_different_classes_are_refused(tmp_path: Path, capsys) -> None:
    a = write_run(tmp_path / "a", seed=0)
    b = write_run(tmp_path / "b", seed=1)
    table = pd.read_csv(b / "final_results.csv")
    table.loc[1, "class_name"] = "tile"
    table.to_csv(b / "final_results.csv", index=False)
    assert run_main(str(a), str(b)) == 2
    assert "same task sequence" in capsys.readouterr().err


def test_groups_keep_distinct_names_when_long_values_are_cut(tmp_path: Path) -> None:
    long = [f"class_with_a_long_name_{i}" for i in range(5)]
    a = write_run(tmp_path / "a", settings={"task_classes": [*long, "leather"]})
    b = write_run(tmp_path / "b", settings={"task_classes": [*long, "grid"]})
    assert run_main(str(a), str(b), "--out", str(tmp_path / "s.csv")) == 0
    names = list(pd.read_csv(tmp_path / "s_groups.csv")["group"])
    assert len(names) == 2 and len(set(names)) == 2 and names[0].endswith("... #1"), names
