"""``python -m megatron_ift.studies.run_study [--quick | --pretrained]``: does IFT beat SFT?

* default (``frozen_lake``, ``arithmetic``): tiny GPTs trained from scratch through the real
  ``megatron-ift train`` path, then evaluated by acting and answering (:mod:`.scratch_tasks`);
* ``--pretrained`` (``smollm2``): fine-tuning SmolLM2-135M-Instruct, IFT against SFT at equal
  steps and equal compute (:mod:`.pretrained`).

For every study config (``--configs``: a file, or a config shipped in
``megatron_ift/studies/configs/``; a ``study:`` section plus a normal run config) the driver
prepares the data, trains one run per (lambda, gamma, seed) point as a subprocess
``python -m megatron_ift.train`` (``--jobs`` at a time, ``--threads`` torch threads each),
evaluates each finished checkpoint in this process, and writes ``results.json``, PNG plots and
the results table of ``docs/study.md`` (paths relative to the current folder: run it from the
checkout to refresh the page).

SFT is ``ift.max_lambda=0 ift.gamma=0``; IFT the paper's lambda 0.2, gamma 0.95; a sweep varies
one of the two at a time. Every point uses the same data, steps and seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import platform as host
import shutil
import sys
import time
from typing import Any, Optional, Sequence

import yaml

from megatron_ift.config_io import set_dotted
from megatron_ift.platform import bootstrap
from megatron_ift.studies.runs import (  # noqa: F401  (re-exported: the studies' public helpers)
    PACKAGE_PARENT,
    Point,
    child_env,
    deep_merge,
    load_study,
    points_and_seeds,
    portable_paths,
    read_curve,
    resolve_config,
    train_run,
)
from megatron_ift.studies.scratch_tasks import (  # noqa: F401
    TASK_TYPES,
    ArithmeticTask,
    FrozenLakeTask,
    summarise,
)

DEFAULT_CONFIGS = ("frozen_lake", "arithmetic")
QUICK_CONFIGS = ("frozen_lake",)
PRETRAINED_CONFIGS = ("smollm2",)


def run_task(config_path: str, args, log, platform) -> dict[str, Any]:
    """One from-scratch study config: data, baselines, every (point, seed) run, evaluations.

    Returns:
        The task's part of ``results.json``.
    """
    study, run_cfg = load_study(config_path, args.quick)
    task_name = study["task"]
    work = os.path.join(args.work_dir, task_name)
    os.makedirs(work, exist_ok=True)
    task = TASK_TYPES[task_name](study, work)
    t0 = time.perf_counter()
    prep = task.prepare()
    run_cfg = copy.deepcopy(run_cfg)
    for dotted, value in {**prep["overrides"], "data.cache_dir": os.path.join(work, "cache")}.items():
        set_dotted(run_cfg, dotted, value)
    base = os.path.join(work, "train.yaml")
    with open(base, "w", encoding="utf-8") as fh:
        yaml.safe_dump(run_cfg, fh, sort_keys=False)
    baselines = task.baselines()
    log(f"[{task_name}] prepared in {time.perf_counter() - t0:.1f}s: {prep['facts']}")
    if baselines:
        log(f"[{task_name}] baselines: " + json.dumps(
            {k: {s: round(v[s]['success_rate'], 3) for s in v} for k, v in baselines.items()}))
    plan = [(point, seed) for point, seeds in points_and_seeds(study).items() for seed in seeds]
    runs: list[Optional[dict]] = [None] * len(plan)

    def train(i: int) -> float:
        point, seed = plan[i]
        return train_run(base, os.path.join(work, "runs", f"{point.key}_s{seed}"), point, seed,
                         args.threads)

    # Training runs are subprocesses, ``args.jobs`` at a time; each finished run is evaluated
    # here while the others keep training. Results are stored in plan order.
    done = 0
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = {pool.submit(train, i): i for i in range(len(plan))}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            point, seed = plan[i]
            run_dir = os.path.join(work, "runs", f"{point.key}_s{seed}")
            train_s = fut.result()
            t = time.perf_counter()
            cached = os.path.join(run_dir, "study_eval.json")
            if train_s == 0.0 and os.path.exists(cached):  # --reuse of an evaluated run
                with open(cached, encoding="utf-8") as fh:
                    result = json.load(fh)
            else:
                result = task.evaluate(run_dir, platform)
                with open(cached, "w", encoding="utf-8") as fh:
                    json.dump(result, fh)
            eval_s = time.perf_counter() - t
            runs[i] = {"point": point.key, "method": point.method, "lambda": point.lam,
                       "gamma": point.gamma, "seed": seed, "train_s": train_s, "eval_s": eval_s,
                       "eval": result, "curve": read_curve(run_dir)}
            done += 1
            log(f"[{task_name}] {done}/{len(plan)} {point.method} lambda={point.lam:g} "
                f"gamma={point.gamma:g} seed={seed}: train {train_s:.0f}s eval {eval_s:.1f}s "
                + " ".join(f"{k}={v:.3f}" for k, v in task.headline(result).items()))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed run stops the queued ones
    return {
        "config_file": portable_paths(config_path, PACKAGE_PARENT),
        "study": study, "train_config": portable_paths(run_cfg, os.getcwd()), "facts": prep["facts"],
        "baselines": baselines,
        "steps": run_cfg["train"]["steps"], "runs": runs,
        "summary": summarise(runs, task.headline), "wall_s": time.perf_counter() - t0,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ift.studies.run_study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", action="store_true",
                        help="the study from a pretrained chat model (studies/smollm2.yaml: "
                             "SmolLM2-135M-Instruct; megatron_ift.studies.pretrained)")
    parser.add_argument("--quick", action="store_true",
                        help="the short variant (each config's quick: section; Frozen Lake only)")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="study YAML files, or names of the shipped ones (frozen_lake, "
                             "arithmetic, smollm2)")
    parser.add_argument("--work-dir", default=None, help="runs and data (default runs/study[_quick])")
    parser.add_argument("--out", default=None,
                        help="results.json and plots (default docs/study; --quick: <work-dir>/out)")
    parser.add_argument("--doc", default=None,
                        help="markdown page whose results block is rewritten (default docs/study.md; "
                             "--quick: none); 'none' to skip")
    parser.add_argument("--jobs", type=int, default=None,
                        help="training runs at a time (default: the CPU count, at most 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: CPU count / jobs)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots and the doc table from <out>/results.json")
    parser.add_argument("--reuse", action="store_true",
                        help="keep completed runs found in the work dir instead of retraining")
    args = parser.parse_args(argv)
    # The study drivers evaluate checkpoints in this process; training runs are subprocesses
    # (each bootstraps its own platform).
    compute = bootstrap()
    cpus = os.cpu_count() or 1
    if args.pretrained:
        return _main_pretrained(args, parser, compute)
    args.jobs = args.jobs or min(4, cpus)
    args.threads = args.threads or max(1, cpus // args.jobs)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    configs = [resolve_config(c) for c in args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)]
    args.work_dir = os.path.abspath(args.work_dir or os.path.join(
        "runs", "study_quick" if args.quick else "study"))
    out = os.path.abspath(args.out or (os.path.join(args.work_dir, "out") if args.quick
                                       else os.path.join("docs", "study")))
    doc = args.doc or ("none" if args.quick else os.path.join("docs", "study.md"))
    if args.replot:
        return _replot(out, doc)
    if not args.reuse and os.path.isdir(args.work_dir):
        for name in os.listdir(args.work_dir):
            shutil.rmtree(os.path.join(args.work_dir, name, "runs"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m megatron_ift.studies.run_study" + (" --quick" if args.quick else ""),
        "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu_count": os.cpu_count(), "platform": host.platform(),
                    "python": host.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "jobs": args.jobs},
        "tasks": {},
    }
    for cfg in configs:
        task = run_task(cfg, args, log, compute)
        results["tasks"][task["study"]["task"]] = task
    results["wall_s"] = time.perf_counter() - start
    _publish(results, out, doc)
    from megatron_ift.studies import report

    log(f"done in {results['wall_s']:.0f}s: {os.path.join(out, 'results.json')}")
    print(report.table(results))
    return 0


def _main_pretrained(args, parser, compute) -> int:
    """The pretrained study: one config at a time, one training run at a time (each run uses
    every core), results under ``docs/study/pretrained``."""
    import torch

    from megatron_ift.studies import pretrained, pretrained_report

    cpus = os.cpu_count() or 1
    if args.jobs not in (None, 1):
        parser.error("--pretrained trains one run at a time (--jobs 1)")
    args.jobs, args.threads = 1, args.threads or cpus
    configs = [resolve_config(c) for c in args.configs or PRETRAINED_CONFIGS]
    args.work_dir = os.path.abspath(args.work_dir or os.path.join("runs", "study_pretrained"))
    out = os.path.abspath(args.out or os.path.join("docs", "study", "pretrained"))
    doc = args.doc or os.path.join("docs", "study.md")
    if args.replot:
        with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
            results = json.load(fh)
        pretrained_report.publish(results, out, doc)
        print(pretrained_report.table(results))
        return 0
    if not args.reuse and os.path.isdir(args.work_dir):
        shutil.rmtree(os.path.join(args.work_dir, "runs"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.work_dir, "calibration"), ignore_errors=True)
        for f in ("base_eval.json", "calibration.json"):
            if os.path.exists(os.path.join(args.work_dir, f)):
                os.remove(os.path.join(args.work_dir, f))
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    start = time.perf_counter()
    for cfg in configs:
        results = pretrained.run_pretrained(cfg, args, log, compute)
        results.update({
            "command": "python -m megatron_ift.studies.run_study --pretrained"
                       + (f" --configs {portable_paths(cfg, PACKAGE_PARENT)}" if args.configs else ""),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.perf_counter() - start))),
            "machine": {"cpu_count": cpus, "platform": host.platform(),
                        "python": host.python_version(), "torch": torch.__version__,
                        "threads": args.threads, "jobs": 1},
            "train_config": portable_paths(results["train_config"], args.work_dir),
        })
        results["wall_s"] = time.perf_counter() - start
        pretrained_report.publish(results, out, doc)
        log(f"done in {results['wall_s']:.0f}s: {os.path.join(out, 'results.json')}")
        print(pretrained_report.table(results))
    return 0


def _publish(results: dict, out: str, doc: str) -> None:
    """Plots, ``results.json`` and (unless ``doc`` is ``none``) the results page's table."""
    from megatron_ift.studies import report

    results["plots"] = report.plots(results, out)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, sort_keys=True)
        fh.write("\n")
    if doc != "none":
        report.update_doc(doc, results, os.path.relpath(out, os.path.dirname(os.path.abspath(doc))))


def _replot(out: str, doc: str) -> int:
    from megatron_ift.studies import report

    with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    _publish(results, out, doc)
    print(report.table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
