"""Batch runs spread over GPUs: one run per GPU at a time, then the summary of all of them.

    python -m moleflow.sweep MODE [--gpus "0 1 2 3"] [--seeds "0 1 2"] [--presets "full wo_lora"]
        [--log_dir DIR] [--run "python run_moleflow.py"] [--extra="--num_epochs 10"] [--dry_run]

``run.sh`` calls this with its variables. Modes: ``main`` (the main configuration, the first seed),
``seeds`` (the main configuration, every seed), ``ablations`` (every preset of
``moleflow.config.ablation.PRESETS``, read at run time, the first seed), ``all`` (every preset x
every seed: the paper's tables). Each run is ``RUN --ablation_preset P --seed S --experiment_name
P_sS --log_dir DIR EXTRA`` with ``CUDA_VISIBLE_DEVICES`` set to its GPU; with ``--gpus cpu`` the
runs go one by one with no GPU visible. ``DIR`` (default ``logs/sweep_<timestamp>``) holds the run
folders, ``commands.txt``, one console log per run (``console/<name>.log``) and the summary
(``python -m moleflow.summarize`` over the runs that finished). A failed run does not stop the
others; the failures are listed at the end with their logs and the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from moleflow.config.ablation import PRESETS

MODES = ("main", "seeds", "ablations", "all")
REPO = Path(__file__).resolve().parents[1]
SWEEP_FLAGS = ("--ablation_preset", "--seed", "--experiment_name", "--log_dir")  # set per run, not in EXTRA


@dataclasses.dataclass
class Job:
    """One run of the sweep and, once it ended, its outcome."""

    preset: str
    seed: str
    command: list[str]
    status: Optional[int] = None        # exit status; None while queued or running
    folder: Optional[Path] = None       # the experiment folder it made

    @property
    def name(self) -> str:
        return f"{self.preset}_s{self.seed}"


def plan(mode: str, presets: Sequence[str], seeds: Sequence[str]) -> list[tuple[str, str]]:
    """(preset, seed) pairs of a mode, seed by seed so that a cut-short sweep has whole seeds."""
    if mode in ("main", "seeds"):
        presets = ["full"]
    if mode in ("main", "ablations"):
        seeds = seeds[:1]
    return [(p, s) for s in seeds for p in presets]


def parse_gpus(text: str) -> list[str]:
    """``"0 1 2"`` / ``"0,1"`` -> one slot per entry (a GPU named twice runs two jobs on it);
    ``"cpu"`` -> one slot with no GPU visible (``""``); anything else: SystemExit."""
    items = text.replace(",", " ").split()
    if items == ["cpu"]:
        return [""]
    if not items or not all(i.isdigit() for i in items):
        raise SystemExit(f"error: GPUS={text!r}: give GPU ids such as \"0 1 2 3\" or cpu")
    return items


def _new_folder(log_dir: Path, name: str, before: set[str]) -> Optional[Path]:
    """The experiment folder ``<name>_<timestamp>[_n]`` that appeared in ``log_dir`` since ``before``."""
    pattern = re.compile(re.escape(name) + r"_\d{8}_\d{6}(_\d+)?")
    made = sorted(p for p in log_dir.glob(f"{name}_*") if pattern.fullmatch(p.name) and p.name not in before)
    return made[-1] if made else None


class Sweep:
    """A queue of jobs run on a fixed set of slots (one GPU each), printing one line per start/end."""

    def __init__(self, jobs: Sequence[Job], slots: Sequence[str], log_dir: Path) -> None:
        self.pending = list(jobs)
        self.slots = list(slots)
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[{_dt.datetime.now():%H:%M:%S}] {text}", flush=True)

    def _next(self) -> Optional[Job]:
        with self.lock:
            return None if self.stop.is_set() or not self.pending else self.pending.pop(0)

    def _slot(self, gpu: str) -> None:
        while (job := self._next()) is not None:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            where = f"GPU {gpu}" if gpu else "CPU"
            console = self.log_dir / "console" / f"{job.name}.log"
            before = {p.name for p in self.log_dir.glob(f"{job.name}_*")}
            self.say(f"start {job.name} on {where}: {shlex.join(job.command)}")
            start = time.monotonic()
            with open(console, "a", encoding="utf-8") as out:  # a LOG_DIR used again keeps earlier logs
                out.write(f"=== {_dt.datetime.now():%Y-%m-%d %H:%M:%S} {where}: {shlex.join(job.command)}\n")
                out.flush()
                try:
                    job.status = subprocess.run(job.command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL).returncode
                except OSError as err:
                    out.write(f"error: cannot start {job.command[0]}: {err}\n")
                    job.status = 127
            seconds = time.monotonic() - start
            job.folder = _new_folder(self.log_dir, job.name, before)
            state = "done" if job.status == 0 else f"FAILED (exit {job.status})"
            self.say(f"{state} {job.name} on {where} in {seconds:.0f} s: "
                     f"{job.folder if job.folder else 'no experiment folder'}")

    def run(self) -> None:
        """Run every job; returns when all have ended (Ctrl-C: no new job starts, running ones end)."""
        threads = [threading.Thread(target=self._slot, args=(gpu,), daemon=True) for gpu in self.slots]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads):
                time.sleep(0.05)
        except KeyboardInterrupt:
            self.stop.set()
            self.say("interrupted: no new run starts; waiting for the running ones")
            for thread in threads:
                thread.join()


def failure(job: Job, console: Path) -> Optional[str]:
    """Why a job counts as failed (None when it finished with its results)."""
    if job.status is None:
        return "not started (sweep interrupted)"
    if job.status != 0:
        log = job.folder / "training.log" if job.folder and (job.folder / "training.log").is_file() else None
        return f"exit {job.status}; console {console}" + (f", log {log}" if log else "")
    if job.folder is None or not (job.folder / "final_results.csv").is_file():
        return f"exit 0 but no experiment folder with final_results.csv; console {console}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moleflow.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--gpus", default="0", help='GPU ids, one run per id at a time ("0 1 2 3"), or cpu')
    parser.add_argument("--seeds", default="0 1 2", help='seeds ("0 1 2"); main and ablations use the first')
    parser.add_argument("--presets", default="", help="presets of ablations/all (default: every preset)")
    parser.add_argument("--log_dir", default=None, help="shared --log_dir of the runs (default logs/sweep_<time>)")
    parser.add_argument("--run", default=f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'run_moleflow.py'))}",
                        help="command that starts one run (default: this python, run_moleflow.py)")
    parser.add_argument("--extra", default="", help='flags for every run; write --extra="--num_epochs 10"')
    parser.add_argument("--dry_run", action="store_true", help="print the command lines, run nothing")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a sweep; exit status 0 (all finished), 1 (a run or the summary failed), 2 (bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        slots = parse_gpus(args.gpus)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    seeds = args.seeds.split()
    presets = args.presets.split() or list(PRESETS)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not seeds or not all(s.isdigit() for s in seeds):
        print(f"error: unknown preset(s) {unknown}; valid: {', '.join(PRESETS)}" if unknown else
              f"error: SEEDS={args.seeds!r}: give non-negative integers such as \"0 1 2\"", file=sys.stderr)
        return 2
    owned = [t for t in shlex.split(args.extra) if t.split("=")[0] in SWEEP_FLAGS]
    if owned:
        print(f"error: {' '.join(owned)} in EXTRA: the sweep sets {', '.join(SWEEP_FLAGS)} of every run; "
              "use PRESETS, SEEDS and LOG_DIR instead", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or f"logs/sweep_{_dt.datetime.now():%Y%m%d_%H%M%S}")
    jobs = [Job(p, s, [*shlex.split(args.run), "--ablation_preset", p, "--seed", s, "--experiment_name",
                       f"{p}_s{s}", "--log_dir", str(log_dir), *shlex.split(args.extra)])
            for p, s in plan(args.mode, presets, seeds)]
    lines = [shlex.join(j.command) for j in jobs]
    if args.dry_run:
        print("\n".join(lines))
        return 0
    (log_dir / "console").mkdir(parents=True, exist_ok=True)
    with open(log_dir / "commands.txt", "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    where = "the CPU, one at a time" if slots == [""] else f"GPU(s) {' '.join(slots)}, one run per slot"
    print(f"sweep {args.mode}: {len(jobs)} run(s) on {where}; folders, console logs and summary in {log_dir}")
    Sweep(jobs, slots, log_dir).run()
    outcomes = [(job, failure(job, log_dir / "console" / f"{job.name}.log")) for job in jobs]
    finished = [str(job.folder) for job, why in outcomes if why is None]
    failed = [(job, why) for job, why in outcomes if why is not None]
    status = 0
    if finished:
        from moleflow import summarize
        print(f"\n$ python -m moleflow.summarize {shlex.join(finished)}")
        status = int(summarize.main(finished) != 0)
    if failed:
        print(f"\n{len(failed)} of {len(jobs)} run(s) failed:", file=sys.stderr)
        for job, why in failed:
            print(f"  {job.name}: {why}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
