"""Study tasks in plain words for a pretrained chat model: Frozen Lake plans and multi-digit
addition with a worked answer. Pure data and scoring (no model): each task writes SFT
conversations (``{"messages": [...]}``) and scores free-text answers.

**Frozen Lake as a chat.** The user turn shows the lake row by row in words and the start
position; the assistant answers with the whole plan as move words::

    user:      Frozen lake, 4 x 4 ... S F F F / F H F H / ... You are at row 1, column 1 ...
    assistant: down, down, right, right, down, right

On a deterministic lake a plan is a policy (the outcome of every move is known in advance), so
executing the answer's moves from the start gives exactly the episode a step-by-step policy
would play. One answer per lake lets a whole batch of unseen lakes be decoded at once with the
KV cache, and IFT's temporal weights run along the plan. The demonstrations are the episodes of
the noisy (epsilon) or optimal demonstrator of :mod:`.frozen_lake` that reached the goal.

**Addition with a worked answer.** ``What is 4821 + 3967?`` answered column by column from the
right with the carries, then ``So 4821 + 3967 = 8788.``. A reply is scored by its *last* number
(so the base model, which does not know the format, is scored fairly), against the sum computed
from the question.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_ift.studies import frozen_lake as fl

MOVE_WORDS = ("left", "down", "right", "up")
"""Move words indexed by Gymnasium's action id (0..3 = L D R U)."""
_WORD_RE = re.compile(r"[a-z]+")
_NUMBER_RE = re.compile(r"-?\d[\d,]*")


def write_conversations(path: str, conversations: Sequence[list[dict]]) -> int:
    """Write ``{"messages": ...}`` lines; returns the number written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for msgs in conversations:
            fh.write(json.dumps({"messages": msgs}, sort_keys=True) + "\n")
    return len(conversations)


# -- Frozen Lake -------------------------------------------------------------------------------


def lake_question(desc: Sequence[str]) -> str:
    """The user's question about one lake, in plain words."""
    n = len(desc)
    rows = "\n".join(" ".join(row) for row in desc)
    return (f"Frozen lake, {n} x {n} grid, row 1 at the top (S start, F frozen ice, H hole, "
            f"G goal):\n{rows}\nYou are at row 1, column 1. Which moves (up, down, left, right) "
            "take you to the goal without falling into a hole? Answer with the moves only, "
            "separated by commas.")


def lake_answer(actions: Sequence[int]) -> str:
    """The plan as the assistant writes it: ``"down, down, right"``."""
    return ", ".join(MOVE_WORDS[a] for a in actions)


def parse_moves(text: str) -> list[int]:
    """The move words of a reply, in order (other words ignored; no move words: empty)."""
    index = {w: i for i, w in enumerate(MOVE_WORDS)}
    return [index[w] for w in _WORD_RE.findall(text.lower()) if w in index]


def play_plan(desc: Sequence[str], moves: Sequence[int], max_steps: int) -> fl.Episode:
    """Execute ``moves`` from the start of a deterministic lake until a hole, the goal, the end
    of the plan or ``max_steps``. An empty plan is an invalid episode."""
    plan = list(moves)[:max_steps]
    follow = iter(plan)
    # the lake is deterministic: the policy ignores the state and the generator is unused
    ep = fl.rollout(fl.FrozenLake(desc, slippery=False), lambda _s, _rng: next(follow),
                    random.Random(0), len(plan))
    ep.invalid = not moves
    return ep


def score_plans(replies: Sequence[str], maps: Sequence[Sequence[str]], max_steps: int) -> dict:
    """Success rate, discounted return (0.99 per step), mean plan length and the fraction of
    replies without any move word, of replies to ``maps``."""
    eps = [play_plan(m, parse_moves(r), max_steps) for r, m in zip(replies, maps)]
    n = max(len(eps), 1)
    return {
        "success_rate": sum(e.success for e in eps) / n,
        "mean_return": sum(0.99 ** (e.steps - 1) for e in eps if e.success) / n,
        "mean_steps": sum(e.steps for e in eps) / n,
        "invalid_rate": sum(e.invalid for e in eps) / n,
    }


@dataclass(frozen=True, kw_only=True)
class LakeChatConfig:
    """How the Frozen Lake chat data are made."""

    train_maps: int = 200
    """Distinct training lakes."""
    episodes_per_map: int = 2
    """Demonstrations played per training lake (successful ones are kept)."""
    epsilon: float = 0.2
    """Demonstrator noise (0: optimal demonstrations)."""
    test_maps: int = 60
    """Unseen lakes of the evaluation (none of them a training lake)."""
    size: int = 4
    """Lake side length."""
    p_frozen: float = 0.8
    """Probability that a generated cell is frozen."""
    max_steps: int = 24
    """Step cap of demonstrations and of executed plans."""
    seed: int = 0
    """Seed of maps and demonstrations."""

    def __post_init__(self) -> None:
        for name in ("train_maps", "episodes_per_map", "test_maps", "size", "max_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"study.data.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"study.data.epsilon must be in [0, 1], got {self.epsilon}")


def lake_chat_data(cfg: LakeChatConfig, out_path: str) -> tuple[dict, list[tuple[str, ...]]]:
    """Write the demonstrations as conversations and choose the unseen test lakes.

    Returns:
        ``(facts, test maps)``: facts are counts for the results (demonstrations, mean length).
    """
    train = fl.generate_maps(cfg.train_maps, cfg.size, cfg.seed, cfg.p_frozen)
    test = fl.generate_maps(cfg.test_maps, cfg.size, cfg.seed + 100_003, cfg.p_frozen, exclude=train)
    demo = fl.DemoDataConfig(size=cfg.size, p_frozen=cfg.p_frozen, train_maps=cfg.train_maps,
                             episodes_per_map=cfg.episodes_per_map, epsilon=cfg.epsilon,
                             max_steps=cfg.max_steps, seed=cfg.seed)
    episodes = fl.demonstrations(demo, train)
    convs = [[{"role": "user", "content": lake_question(e.desc)},
              {"role": "assistant", "content": lake_answer(e.actions)}] for e in episodes]
    write_conversations(out_path, convs)
    steps = [e.steps for e in episodes]
    return {"demonstrations": len(episodes), "mean_demo_steps": sum(steps) / max(len(steps), 1),
            "train_maps": len(train), "test_maps": len(test)}, test


def optimal_plans(maps: Sequence[Sequence[str]], seed: int = 0) -> list[list[int]]:
    """One shortest plan per lake (reference answers for the held-out loss)."""
    rng = random.Random(seed)
    out = []
    for desc in maps:
        env = fl.FrozenLake(desc)
        out.append(fl.rollout(env, fl.Demonstrator(env).act, rng, 4 * env.num_states).actions)
    return out


# -- addition ----------------------------------------------------------------------------------


def addition_question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def worked_addition(a: int, b: int) -> str:
    """Column addition from the right, one sentence per column, then the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, parts = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        nxt = total // 10
        parts.append(f"{terms} = {total}, write {total % 10}" + (f", carry {nxt}" if nxt else "") + ".")
        carry = nxt
    if carry:
        parts.append(f"Write the carry {carry}.")
    return " ".join(parts) + f" So {a} + {b} = {a + b}."


def last_number(text: str) -> Optional[int]:
    """The last integer in ``text`` (thousands commas allowed), or None."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", "").rstrip(","))
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True)
class AdditionConfig:
    """How the addition data are made."""

    digits: int = 4
    """Digits of each operand (both have exactly this many)."""
    train_items: int = 2000
    """Training conversations."""
    test_items: int = 60
    """Held-out questions (no pair of operands occurs in training)."""
    worked: bool = True
    """Worked answers (column by column); False: the bare ``a + b = c``."""
    seed: int = 0
    """Seed of the operands."""

    def __post_init__(self) -> None:
        for name in ("digits", "train_items", "test_items"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"study.data.{name} must be at least 1, got {getattr(self, name)}")


def addition_answer(a: int, b: int, worked: bool) -> str:
    return worked_addition(a, b) if worked else f"{a} + {b} = {a + b}."


def addition_data(cfg: AdditionConfig, out_path: str) -> tuple[dict, list[tuple[int, int]]]:
    """Write the training conversations; returns ``(facts, held-out operand pairs)``."""
    rng = random.Random(cfg.seed)
    lo, hi = 10 ** (cfg.digits - 1), 10 ** cfg.digits - 1
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(pairs) < cfg.train_items + cfg.test_items:
        p = (rng.randint(lo, hi), rng.randint(lo, hi))
        if p not in seen:
            seen.add(p)
            pairs.append(p)
    test, train = pairs[: cfg.test_items], pairs[cfg.test_items:]
    convs = [[{"role": "user", "content": addition_question(a, b)},
              {"role": "assistant", "content": addition_answer(a, b, cfg.worked)}] for a, b in train]
    write_conversations(out_path, convs)
    return {"train_items": len(train), "test_items": len(test), "digits": cfg.digits}, test


def score_additions(replies: Sequence[str], pairs: Sequence[tuple[int, int]]) -> dict:
    """Exact match of each reply's last number with the sum, and the fraction with no number."""
    got = [last_number(r) for r in replies]
    n = max(len(pairs), 1)
    return {"exact_match": sum(g == a + b for g, (a, b) in zip(got, pairs)) / n,
            "no_number_rate": sum(g is None for g in got) / n}
