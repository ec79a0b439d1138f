"""``python -m megatron_ift.studies.run_study [--quick]``: does IFT beat SFT? Tiny GPTs trained from
scratch through the real ``megatron-ift train`` path, then evaluated by acting and answering.

For every study config (``studies/*.yaml``: a ``study:`` section plus a normal run config) the
driver prepares the data, trains one run per (lambda, gamma, seed) point as a subprocess
``python -m megatron_ift.train`` (``--jobs`` at a time, ``--threads`` torch threads each),
evaluates each finished checkpoint in this process, and writes ``results.json``, PNG plots and
the results table of ``docs/study.md``.

* ``frozen_lake``: demonstrations on generated 4x4 lakes; greedy success rate and return on the
  training lakes and on unseen lakes, against a random and the optimal policy on the same lakes.
* ``arithmetic``: the shipped addition / reversal data; exact match on held-out questions.

SFT is ``ift.max_lambda=0 ift.gamma=0``; IFT the paper's lambda 0.2, gamma 0.95; a sweep varies
one of the two at a time. Every point uses the same data, steps and seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

from megatron_ift.config_io import set_dotted

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIGS = ("studies/frozen_lake.yaml", "studies/arithmetic.yaml")
QUICK_CONFIGS = ("studies/frozen_lake.yaml",)
PRETRAINED_CONFIGS = ("studies/smollm2.yaml",)
CURVE_KEYS = ("loss", "loss_sft", "loss_mixed_sft", "estimate_accuracy", "lambda")
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Point:
    """One training setting: ``(max_lambda, gamma)``; SFT is (0, 0)."""

    lam: float
    gamma: float

    @property
    def method(self) -> str:
        if self.lam == 0.0 and self.gamma == 0.0:
            return "SFT"
        return "IFT"

    @property
    def key(self) -> str:
        return f"l{self.lam:g}_g{self.gamma:g}"


def deep_merge(base: dict, extra: Optional[dict]) -> dict:
    """``base`` updated recursively with ``extra`` (a new dict)."""
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_study(path: str, quick: bool) -> tuple[dict, dict]:
    """``(study section, run config)`` of a study file, with ``quick:`` merged in for --quick."""
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    quick_part = raw.pop("quick", None)
    if quick:
        raw = deep_merge(raw, quick_part)
    study = raw.pop("study")
    return study, raw


def points_and_seeds(study: dict) -> dict[Point, list[int]]:
    """Every (lambda, gamma) point of the study and the seeds it is trained with.

    The main comparison (SFT and the IFT default) uses ``seeds``; the sweep varies lambda at the
    default gamma and gamma at the default lambda, with ``sweep.seeds``.
    """
    ift = study.get("ift", {"max_lambda": 0.2, "gamma": 0.95})
    lam0, g0 = float(ift["max_lambda"]), float(ift["gamma"])
    out: dict[Point, list[int]] = {}

    def add(p: Point, seeds: Sequence[int]) -> None:
        out[p] = sorted(set(out.get(p, [])) | {int(s) for s in seeds})

    seeds = study.get("seeds", [1])
    add(Point(0.0, 0.0), seeds)
    add(Point(lam0, g0), seeds)
    sweep = study.get("sweep") or {}
    sweep_seeds = sweep.get("seeds", seeds)
    for lam in sweep.get("lambda", []):
        add(Point(float(lam), g0), sweep_seeds)
    for g in sweep.get("gamma", []):
        add(Point(lam0, float(g)), sweep_seeds)
    return out


def child_env(threads: int) -> dict[str, str]:
    """Environment of a training subprocess: a fresh world of one (no inherited rendezvous)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def train_run(base_config: str, run_dir: str, point: Point, seed: int, threads: int,
              extra: Sequence[str] = ()) -> float:
    """Train one run to completion with ``megatron-ift train``; returns its wall time (s).

    A run directory that already holds a completed run is reused (``--reuse``).

    Raises:
        RuntimeError: the training process failed (its log is named).
    """
    from megatron_ift.checkpoint import layout

    if os.path.exists(os.path.join(run_dir, layout.COMPLETED)):
        return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    cmd = [sys.executable, "-m", "megatron_ift.train", "--config", base_config,
           f"checkpoint.dir={run_dir}", f"ift.max_lambda={point.lam}", f"ift.gamma={point.gamma}",
           f"train.seed={seed}", f"data.seed={seed}", *extra]
    log = run_dir + ".log"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=child_env(threads), stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        with open(log, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"training failed (exit {rc}), log {log}:\n{tail}")
    return time.perf_counter() - start


def portable_paths(obj: Any, root: str) -> Any:
    """``obj`` with every string that is a path inside ``root`` made relative to it (for the
    published results: the checkout's location is not part of the result)."""
    if isinstance(obj, dict):
        return {k: portable_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable_paths(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(obj, root)
    return obj


def read_curve(run_dir: str, every: int = 5) -> list[dict]:
    """Per-step metrics of a run (every ``every``-th step and the last), for learning curves."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    keep = [r for i, r in enumerate(rows) if (i + 1) % every == 0 or i == 0 or i == len(rows) - 1]
    return [{"step": r["step"], **{k: r[k] for k in CURVE_KEYS if k in r}} for r in keep]


# -- tasks -------------------------------------------------------------------------------------


class FrozenLakeTask:
    """Demonstrations on generated lakes; greedy rollouts on seen and unseen lakes."""

    name = "frozen_lake"

    def __init__(self, study: dict, work: str) -> None:
        from megatron_ift.studies import frozen_lake as fl

        self.fl = fl
        env, data, ev = study["env"], study["data"], study["eval"]
        self.size, self.slippery = int(env["size"]), bool(env.get("slippery", False))
        self.slip = float(env.get("slip", fl.GYM_SLIP))
        self.max_steps = int(env["max_steps"])
        self.demo_cfg = fl.DemoDataConfig(
            size=self.size, slippery=self.slippery, slip=self.slip,
            p_frozen=float(env.get("p_frozen", 0.8)), train_maps=int(data["train_maps"]),
            episodes_per_map=int(data["episodes_per_map"]), epsilon=float(data["epsilon"]),
            keep_failures=bool(data.get("keep_failures", False)), max_steps=self.max_steps,
            seed=int(data.get("seed", 0)),
        )
        self.eval_cfg = ev
        self.work = work

    def prepare(self) -> dict[str, Any]:
        """Write the tokenizer and demonstrations; returns run-config overrides and facts."""
        fl, c = self.fl, self.demo_cfg
        tok = fl.write_tokenizer(os.path.join(self.work, "tokenizer"))
        self.train_maps = fl.generate_maps(c.train_maps, c.size, c.seed, c.p_frozen)
        seen = self.train_maps[: int(self.eval_cfg["seen_maps"])]
        unseen = fl.generate_maps(int(self.eval_cfg["unseen_maps"]), c.size,
                                  c.seed + 100_003, c.p_frozen, exclude=self.train_maps)
        self.eval_maps = {"seen": seen, "unseen": unseen}
        # Held-out demonstrations (same demonstrator, unseen lakes) for a teacher-forced loss.
        held = fl.demonstrations(dataclasses.replace(c, seed=c.seed + 1, episodes_per_map=1), unseen)
        codec = fl.Codec()
        self.heldout = [fl.episode_tokens(e, codec) for e in held]
        episodes = fl.demonstrations(c, self.train_maps)
        path = os.path.join(self.work, "demonstrations.jsonl")
        fl.write_jsonl(path, episodes)
        steps = [e.steps for e in episodes]
        return {
            "overrides": {"data.paths": [path], "data.tokenizer_path": tok,
                          "model.vocab_size": len(fl.vocabulary())},
            "facts": {"demonstrations": len(episodes), "mean_demo_steps": sum(steps) / len(steps),
                      "train_maps": len(self.train_maps), "demo": c.__dict__},
        }

    def _eval_kwargs(self) -> dict:
        return dict(slippery=self.slippery, slip=self.slip, max_steps=self.max_steps,
                    episodes_per_map=int(self.eval_cfg.get("episodes_per_map", 1)),
                    seed=int(self.eval_cfg.get("seed", 1)))

    def baselines(self) -> dict[str, dict]:
        fl = self.fl
        out = {}
        for name, policy in (("random", fl.random_policy), ("optimal", fl.optimal_policy_factory()),
                             ("demonstrator", fl.optimal_policy_factory(self.demo_cfg.epsilon))):
            out[name] = {split: fl.evaluate_state_policy(policy, maps, **self._eval_kwargs()).as_dict()
                         for split, maps in self.eval_maps.items()}
        return out

    def evaluate(self, run_dir: str) -> dict[str, Any]:
        import torch

        from megatron_ift.studies.generate import LoadedModel, frozen_lake_policy

        model = LoadedModel(run_dir)
        policy = frozen_lake_policy(model)
        out: dict[str, Any] = {split: self.fl.evaluate_batched(policy, maps, **self._eval_kwargs()).as_dict()
                               for split, maps in self.eval_maps.items()}
        logps = model.token_logprobs([ids for ids, _ in self.heldout])
        num = sum(-(lp * torch.tensor(m[1:], dtype=lp.dtype)).sum().item()
                  for lp, (_, m) in zip(logps, self.heldout))
        out["heldout_nll"] = num / sum(sum(m[1:]) for _, m in self.heldout)
        return out

    @staticmethod
    def headline(result: dict) -> dict[str, float]:
        """The scalar metrics summarised over seeds."""
        out = {f"{split}_{m}": result[split][m] for split in ("seen", "unseen")
               for m in ("success_rate", "mean_return")}
        if "heldout_nll" in result:
            out["heldout_nll"] = result["heldout_nll"]
        return out


class ArithmeticTask:
    """Held-out exact match on the shipped addition / reversal data."""

    name = "arithmetic"

    def __init__(self, study: dict, work: str) -> None:
        self.study, self.work = study, work

    def prepare(self) -> dict[str, Any]:
        from megatron_ift.studies import tasks

        data_dir = os.path.join(ROOT, self.study.get("data_dir", "data"))
        path, self.items = tasks.split(data_dir, self.work, int(self.study.get("num_test", 200)),
                                       int(self.study.get("split_seed", 0)))
        with open(path, encoding="utf-8") as fh:
            n = sum(1 for _ in fh)
        self.tokenizer_path = os.path.join(data_dir, "tokenizer")
        return {"overrides": {"data.paths": [path], "data.tokenizer_path": self.tokenizer_path},
                "facts": {"train_conversations": n, "test_items": len(self.items)}}

    def baselines(self) -> dict[str, dict]:
        return {}

    def evaluate(self, run_dir: str) -> dict[str, Any]:
        from megatron_ift.data import load_tokenizer
        from megatron_ift.studies import tasks
        from megatron_ift.studies.generate import LoadedModel

        model = LoadedModel(run_dir)
        tok = load_tokenizer(self.tokenizer_path)
        return tasks.evaluate(model, tok, self.items, int(self.study.get("max_new_tokens", 24)))

    @staticmethod
    def headline(result: dict) -> dict[str, float]:
        return {k: v for k, v in result.items() if k.startswith("exact_match") or k == "heldout_nll"}


TASK_TYPES = {"frozen_lake": FrozenLakeTask, "arithmetic": ArithmeticTask}


# -- summaries ---------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, float]:
    import statistics

    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def summarise(runs: list[dict], headline) -> dict[str, Any]:
    """Mean / spread per point and the paired (same seed) difference of every IFT point to SFT."""
    by_point: dict[str, list[dict]] = {}
    for r in runs:
        by_point.setdefault(r["point"], []).append(r)
    points = {}
    for key, rs in by_point.items():
        metrics = [headline(r["eval"]) for r in rs]
        points[key] = {
            "method": rs[0]["method"], "lambda": rs[0]["lambda"], "gamma": rs[0]["gamma"],
            "seeds": [r["seed"] for r in rs],
            "metrics": {m: _stats([x[m] for x in metrics]) for m in metrics[0]},
            "final_loss_sft": _stats([r["curve"][-1]["loss_sft"] for r in rs]),
        }
    sft = {r["seed"]: headline(r["eval"]) for r in by_point.get(Point(0.0, 0.0).key, [])}
    for key, p in points.items():
        if p["method"] == "SFT":
            continue
        mine = {r["seed"]: headline(r["eval"]) for r in by_point[key]}
        common = sorted(set(mine) & set(sft))
        if common:
            p["minus_sft"] = {m: _stats([mine[s][m] - sft[s][m] for s in common])
                              for m in mine[common[0]]}
            p["wins_vs_sft"] = {m: sum(mine[s][m] > sft[s][m] for s in common) for m in mine[common[0]]}
    return points


# -- driver ------------------------------------------------------------------------------------


def run_task(config_path: str, args, log) -> dict[str, Any]:
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
                result = task.evaluate(run_dir)
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
        "config_file": os.path.relpath(config_path, ROOT) if os.path.isabs(config_path) else config_path,
        "study": study, "train_config": portable_paths(run_cfg, ROOT), "facts": prep["facts"],
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
    parser.add_argument("--configs", nargs="+", default=None, help="study YAML files")
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
    cpus = os.cpu_count() or 1
    if args.pretrained:
        return _main_pretrained(args, parser)
    args.jobs = args.jobs or min(4, cpus)
    args.threads = args.threads or max(1, cpus // args.jobs)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    configs = args.configs or list(QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    configs = [c if os.path.isabs(c) else os.path.join(ROOT, c) for c in configs]
    args.work_dir = os.path.abspath(args.work_dir or os.path.join(
        ROOT, "runs", "study_quick" if args.quick else "study"))
    out = os.path.abspath(args.out or (os.path.join(args.work_dir, "out") if args.quick
                                       else os.path.join(ROOT, "docs", "study")))
    doc = args.doc or ("none" if args.quick else os.path.join(ROOT, "docs", "study.md"))
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
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "jobs": args.jobs},
        "tasks": {},
    }
    for cfg in configs:
        task = run_task(cfg, args, log)
        results["tasks"][task["study"]["task"]] = task
    results["wall_s"] = time.perf_counter() - start
    _publish(results, out, doc)
    from megatron_ift.studies import report

    log(f"done in {results['wall_s']:.0f}s: {os.path.join(out, 'results.json')}")
    print(report.table(results))
    return 0


def _main_pretrained(args, parser) -> int:
    """The pretrained study: one config at a time, one training run at a time (each run uses
    every core), results under ``docs/study/pretrained``."""
    import torch

    from megatron_ift.studies import pretrained, pretrained_report

    cpus = os.cpu_count() or 1
    if args.jobs not in (None, 1):
        parser.error("--pretrained trains one run at a time (--jobs 1)")
    args.jobs, args.threads = 1, args.threads or cpus
    configs = args.configs or list(PRETRAINED_CONFIGS)
    configs = [c if os.path.isabs(c) else os.path.join(ROOT, c) for c in configs]
    args.work_dir = os.path.abspath(args.work_dir or os.path.join(ROOT, "runs", "study_pretrained"))
    out = os.path.abspath(args.out or os.path.join(ROOT, "docs", "study", "pretrained"))
    doc = args.doc or os.path.join(ROOT, "docs", "study.md")
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
        results = pretrained.run_pretrained(cfg, args, log)
        results.update({
            "command": "python -m megatron_ift.studies.run_study --pretrained"
                       + (f" --configs {os.path.relpath(cfg, ROOT)}" if args.configs else ""),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.perf_counter() - start))),
            "machine": {"cpu_count": cpus, "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__,
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
