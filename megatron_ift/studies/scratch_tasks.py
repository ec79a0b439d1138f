"""The from-scratch study's tasks (``python -m megatron_ift.studies.run_study``): what each
trains on, how a checkpoint is evaluated, and its metadata (metrics, labels), which the driver
and :mod:`.report` read from here."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from megatron_ift.studies.runs import PACKAGE_PARENT, Point, stats

NOT_PERCENT = {"heldout_nll"}
"""Metrics that are not rates (losses, lower is better)."""


def shipped_data_dir(path: str) -> str:
    """``study.data_dir`` as given if it exists (absolute or from the current folder), else
    relative to the checkout holding the package.

    Raises:
        FileNotFoundError: found in neither place.
    """
    for candidate in (path, os.path.join(PACKAGE_PARENT, path)):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"study.data_dir: {path!r} not found here nor in {PACKAGE_PARENT}; run "
                            "from the checkout or set an absolute path to the shipped data/")


class FrozenLakeTask:
    """Demonstrations on generated lakes; greedy rollouts on seen and unseen lakes."""

    name = "frozen_lake"
    primary = (("unseen_success_rate", "success, unseen lakes"),
               ("seen_success_rate", "success, training lakes"))
    """Headline metrics ``(key, label)``: table columns; the first two are the sweep plots'."""
    secondary = (("unseen_mean_return", "return, unseen"), ("seen_mean_return", "return, seen"),
                 ("heldout_nll", "held-out demo loss"))
    """Further table columns."""
    baseline_metric = "success_rate"
    """The baselines' metric drawn beside the primary ones (None: no baselines)."""

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

    def evaluate(self, run_dir: str, platform) -> dict[str, Any]:
        import torch

        from megatron_ift.studies.generate import LoadedModel, frozen_lake_policy

        model = LoadedModel(run_dir, platform)
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
    primary = (("exact_match", "exact match"), ("exact_match_add", "exact match, add"),
               ("exact_match_reverse", "exact match, reverse"))
    secondary = (("heldout_nll", "held-out answer loss"),)
    baseline_metric = None

    def __init__(self, study: dict, work: str) -> None:
        self.study, self.work = study, work

    def prepare(self) -> dict[str, Any]:
        from megatron_ift.studies import tasks

        data_dir = shipped_data_dir(self.study.get("data_dir", "data"))
        path, self.items = tasks.split(data_dir, self.work, int(self.study.get("num_test", 200)),
                                       int(self.study.get("split_seed", 0)))
        with open(path, encoding="utf-8") as fh:
            n = sum(1 for _ in fh)
        self.tokenizer_path = os.path.join(data_dir, "tokenizer")
        return {"overrides": {"data.paths": [path], "data.tokenizer_path": self.tokenizer_path},
                "facts": {"train_conversations": n, "test_items": len(self.items)}}

    def baselines(self) -> dict[str, dict]:
        return {}

    def evaluate(self, run_dir: str, platform) -> dict[str, Any]:
        from megatron_ift.data import load_tokenizer
        from megatron_ift.studies import tasks
        from megatron_ift.studies.generate import LoadedModel

        model = LoadedModel(run_dir, platform)
        tok = load_tokenizer(self.tokenizer_path)
        return tasks.evaluate(model, tok, self.items, int(self.study.get("max_new_tokens", 24)))

    @staticmethod
    def headline(result: dict) -> dict[str, float]:
        return {k: v for k, v in result.items() if k.startswith("exact_match") or k == "heldout_nll"}


TASK_TYPES = {"frozen_lake": FrozenLakeTask, "arithmetic": ArithmeticTask}


def columns(name: str) -> list[tuple[str, str]]:
    """Every table column ``(key, label)`` of task ``name``."""
    cls = TASK_TYPES[name]
    return list(cls.primary) + list(cls.secondary)


# -- summaries ---------------------------------------------------------------------------------


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
            "metrics": {m: stats([x[m] for x in metrics]) for m in metrics[0]},
            "final_loss_sft": stats([r["curve"][-1]["loss_sft"] for r in rs]),
        }
    sft = {r["seed"]: headline(r["eval"]) for r in by_point.get(Point(0.0, 0.0).key, [])}
    for key, p in points.items():
        if p["method"] == "SFT":
            continue
        mine = {r["seed"]: headline(r["eval"]) for r in by_point[key]}
        common = sorted(set(mine) & set(sft))
        if common:
            p["minus_sft"] = {m: stats([mine[s][m] - sft[s][m] for s in common])
                              for m in mine[common[0]]}
            p["wins_vs_sft"] = {m: sum(mine[s][m] > sft[s][m] for s in common) for m in mine[common[0]]}
    return points


# -- driver ------------------------------------------------------------------------------------
