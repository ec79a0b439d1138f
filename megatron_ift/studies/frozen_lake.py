"""Frozen Lake: the grid game of the IFT paper's small-scale check, its demonstrators, and its
trajectories as SFT conversations.

The game (Gymnasium's ``FrozenLake-v1`` rules)::

    S F F F      S start, F frozen (safe), H hole (episode ends, return 0),
    F H F H      G goal (episode ends, return 1). Actions 0..3 = L D R U.
    F F F H      Moving into the border leaves the agent in place. Slippery: the intended
    H F F G      move with probability 1 - slip, each perpendicular move with slip / 2
                 (Gymnasium: slip = 2/3).

Maps are generated from a seed with a guaranteed start-goal path (:func:`generate_map`). The
optimal demonstrator acts greedily on the value-iteration values (for a deterministic lake these
are shortest paths); the noisy one replaces its action by a uniformly random one with probability
``epsilon``.

A trajectory becomes a multi-turn conversation, one turn per step, so that the assistant tokens
are the actions and every observation is a prompt token (never trained)::

    user:      map S F F F / F H F H / F F F H / H F F G pos 0
    assistant: R
    user:      pos 1
    assistant: R
    ...

rendered by this study's chat template as ``"<user text>\\n"`` and ``"<action> <|end|>\\n"``, and
tokenised by a word-level tokenizer (:func:`write_tokenizer`): one token per cell, position and
action, so a step costs four tokens. At inference (:mod:`megatron_ift.studies.generate`) the model
reads the same text and its greedy next token is the action.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_ift.data.tokenizer import write_tokenizer_folder

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTIONS = ("L", "D", "R", "U")
"""Action tokens, indexed by action id (Gymnasium's order)."""
_MOVES = {LEFT: (0, -1), DOWN: (1, 0), RIGHT: (0, 1), UP: (-1, 0)}
CELLS = ("S", "F", "H", "G")
GYM_SLIP = 2.0 / 3.0
"""Gymnasium's slippery lake: the intended move with probability 1/3."""

END_TOKEN = "<|end|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", END_TOKEN, "<|unk|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- message['content'] + ' <|end|>\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
"""Compact chat template: user turns as text lines, assistant turns ended by ``<|end|>``. The
generation prompt is empty, so the model's next token after an observation is its action."""


# -- maps ------------------------------------------------------------------------------------


def _neighbours(size: int, r: int, c: int):
    for dr, dc in _MOVES.values():
        nr, nc = r + dr, c + dc
        if 0 <= nr < size and 0 <= nc < size:
            yield nr, nc


def has_path(desc: Sequence[str]) -> bool:
    """Whether the goal is reachable from the start without stepping into a hole."""
    size = len(desc)
    seen = {(0, 0)}
    frontier = deque([(0, 0)])
    while frontier:
        r, c = frontier.popleft()
        if desc[r][c] == "G":
            return True
        for nr, nc in _neighbours(size, r, c):
            if (nr, nc) not in seen and desc[nr][nc] != "H":
                seen.add((nr, nc))
                frontier.append((nr, nc))
    return False


def generate_map(size: int, rng: random.Random, p_frozen: float = 0.8) -> tuple[str, ...]:
    """A random ``size x size`` lake with the start top-left, the goal bottom-right and a
    guaranteed path between them (resampled until one exists, as Gymnasium does).

    Args:
        size: side length (4 and 8 are the classic lakes).
        rng: source of randomness (the map is a pure function of its state).
        p_frozen: probability that an inner cell is frozen rather than a hole.

    Returns:
        The rows, e.g. ``("SFFF", "FHFH", "FFFH", "HFFG")``.
    """
    if size < 2:
        raise ValueError(f"a lake needs size >= 2, got {size}")
    if not 0.0 < p_frozen <= 1.0:
        raise ValueError(f"p_frozen={p_frozen} must be in (0, 1]")
    while True:
        grid = [["F" if rng.random() < p_frozen else "H" for _ in range(size)] for _ in range(size)]
        grid[0][0], grid[-1][-1] = "S", "G"
        desc = tuple("".join(row) for row in grid)
        if has_path(desc):
            return desc


def generate_maps(
    count: int, size: int, seed: int, p_frozen: float = 0.8, exclude: Sequence[Sequence[str]] = ()
) -> list[tuple[str, ...]]:
    """``count`` distinct maps from ``seed``, none of them in ``exclude`` (held-out maps)."""
    rng = random.Random(seed)
    seen = {tuple(m) for m in exclude}
    out: list[tuple[str, ...]] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 1000 * count + 10_000:
            raise ValueError(f"cannot find {count} distinct {size}x{size} maps (p_frozen={p_frozen})")
        m = generate_map(size, rng, p_frozen)
        if m not in seen:
            seen.add(m)
            out.append(m)
    return out


# -- the environment -------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    prob: float
    next_state: int
    reward: float
    done: bool


class FrozenLake:
    """One lake: exact transition table, seeded stepping.

    Args:
        desc: the rows of the map (``S``, ``F``, ``H``, ``G``).
        slippery: whether moves can slip sideways.
        slip: total probability of slipping (split evenly between the two perpendicular moves).
    """

    def __init__(self, desc: Sequence[str], slippery: bool = False, slip: float = GYM_SLIP) -> None:
        self.desc = tuple(desc)
        self.size = len(self.desc)
        if any(len(row) != self.size for row in self.desc):
            raise ValueError(f"the map must be square, got rows of lengths {[len(r) for r in desc]}")
        if any(ch not in CELLS for row in self.desc for ch in row):
            raise ValueError(f"map cells must be among {CELLS}: {desc}")
        if not 0.0 <= slip < 1.0:
            raise ValueError(f"slip={slip} must be in [0, 1)")
        self.slippery = slippery
        self.slip = slip if slippery else 0.0
        self.num_states = self.size * self.size
        flat = "".join(self.desc)
        self.start = flat.index("S")
        self.cell = flat
        self.P = [[self._outcomes(s, a) for a in range(4)] for s in range(self.num_states)]

    def is_terminal(self, state: int) -> bool:
        return self.cell[state] in "HG"

    def _move(self, state: int, action: int) -> int:
        r, c = divmod(state, self.size)
        dr, dc = _MOVES[action]
        r = min(max(r + dr, 0), self.size - 1)
        c = min(max(c + dc, 0), self.size - 1)
        return r * self.size + c

    def _outcomes(self, state: int, action: int) -> list[Transition]:
        if self.is_terminal(state):
            return [Transition(1.0, state, 0.0, True)]
        if self.slip > 0.0:
            moves = [(action, 1.0 - self.slip), ((action - 1) % 4, self.slip / 2),
                     ((action + 1) % 4, self.slip / 2)]
        else:
            moves = [(action, 1.0)]
        merged: dict[int, float] = {}
        for a, p in moves:
            nxt = self._move(state, a)
            merged[nxt] = merged.get(nxt, 0.0) + p
        return [Transition(p, s, float(self.cell[s] == "G"), self.is_terminal(s))
                for s, p in merged.items()]

    def step(self, state: int, action: int, rng: random.Random) -> tuple[int, float, bool]:
        """Sample one transition: ``(next_state, reward, done)``."""
        if action not in _MOVES:
            raise ValueError(f"action {action!r} is not one of 0..3")
        outs = self.P[state][action]
        u, acc = rng.random(), 0.0
        for t in outs:
            acc += t.prob
            if u < acc:
                return t.next_state, t.reward, t.done
        t = outs[-1]
        return t.next_state, t.reward, t.done


# -- optimal values and demonstrators ---------------------------------------------------------


def shortest_distances(env: FrozenLake) -> np.ndarray:
    """``[states]`` steps to the goal on a deterministic lake (BFS over safe cells; inf if none)."""
    dist = np.full(env.num_states, np.inf)
    goal = env.cell.index("G")
    dist[goal] = 0
    frontier = deque([goal])
    while frontier:
        s = frontier.popleft()
        r, c = divmod(s, env.size)
        for nr, nc in _neighbours(env.size, r, c):
            p = nr * env.size + nc
            if env.cell[p] != "H" and dist[p] == np.inf:
                dist[p] = dist[s] + 1
                frontier.append(p)
    return dist


def value_iteration(env: FrozenLake, discount: float = 0.99, tol: float = 1e-10,
                    max_iter: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Optimal state values ``V [states]`` and action values ``Q [states, 4]`` (reward 1 at the
    goal, 0 otherwise). A discount below 1 makes shorter paths strictly better."""
    V = np.zeros(env.num_states)
    for _ in range(max_iter):
        Q = np.array([[sum(t.prob * (t.reward + (0.0 if t.done else discount * V[t.next_state]))
                           for t in env.P[s][a]) for a in range(4)] for s in range(env.num_states)])
        V_new = Q.max(axis=1)
        if np.max(np.abs(V_new - V)) < tol:
            return V_new, Q
        V = V_new
    return V, Q


def optimal_actions(Q: np.ndarray, state: int, rtol: float = 1e-9) -> list[int]:
    """The actions whose value is (numerically) maximal in ``state``."""
    best = Q[state].max()
    return [a for a in range(4) if Q[state, a] >= best - rtol * max(abs(best), 1e-12)]


class Demonstrator:
    """Optimal (``epsilon = 0``) or noisy demonstrator on one lake.

    Args:
        env: the lake.
        epsilon: probability of a uniformly random action instead of an optimal one.
        discount: value-iteration discount.
    """

    def __init__(self, env: FrozenLake, epsilon: float = 0.0, discount: float = 0.99) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon={epsilon} must be in [0, 1]")
        self.env = env
        self.epsilon = epsilon
        self.V, self.Q = value_iteration(env, discount)
        self.best = [optimal_actions(self.Q, s) for s in range(env.num_states)]

    def act(self, state: int, rng: random.Random) -> int:
        """An action for ``state``: random with probability epsilon, else an optimal one (ties
        broken at random, so demonstrations cover every shortest path)."""
        if self.epsilon > 0.0 and rng.random() < self.epsilon:
            return rng.randrange(4)
        return rng.choice(self.best[state])


# -- episodes --------------------------------------------------------------------------------


@dataclass
class Episode:
    """One played episode. ``states[i]`` is observed before ``actions[i]``; ``states`` has one
    more entry than ``actions`` (the final state)."""

    desc: tuple[str, ...]
    states: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    reward: float = 0.0
    invalid: bool = False
    """The policy produced something that is not an action (the episode stops there)."""

    @property
    def success(self) -> bool:
        return self.reward > 0.0

    @property
    def steps(self) -> int:
        return len(self.actions)


def rollout(env: FrozenLake, policy: Callable[[int, random.Random], int], rng: random.Random,
            max_steps: int) -> Episode:
    """Play one episode with a per-state ``policy(state, rng) -> action``."""
    ep = Episode(env.desc, states=[env.start])
    s = env.start
    for _ in range(max_steps):
        a = policy(s, rng)
        s, r, done = env.step(s, a, rng)
        ep.actions.append(a)
        ep.states.append(s)
        if done:
            ep.reward = r
            break
    return ep


# -- serialisation ---------------------------------------------------------------------------


def map_text(desc: Sequence[str]) -> str:
    """``"S F F F / F H F H / ..."``: one token per cell, rows separated by ``/``."""
    return " / ".join(" ".join(row) for row in desc)


def first_observation(desc: Sequence[str], state: int) -> str:
    return f"map {map_text(desc)} pos {state}"


def observation(state: int) -> str:
    return f"pos {state}"


def episode_messages(ep: Episode) -> list[dict]:
    """The episode as a conversation: an observation per user turn, an action per assistant turn
    (the final state is not shown: nothing follows it to train)."""
    msgs = []
    for i, a in enumerate(ep.actions):
        text = first_observation(ep.desc, ep.states[i]) if i == 0 else observation(ep.states[i])
        msgs.append({"role": "user", "content": text})
        msgs.append({"role": "assistant", "content": ACTIONS[a]})
    return msgs


def vocabulary(max_size: int = 8) -> list[str]:
    """Word-level vocabulary: special tokens, words, cells, actions, positions up to
    ``max_size x max_size``."""
    words = ["map", "pos", "/", *CELLS, *ACTIONS]
    return [*SPECIAL_TOKENS, *words, *(str(i) for i in range(max_size * max_size))]


def write_tokenizer(out_dir: str, max_size: int = 8) -> str:
    """Write a word-level Hugging Face tokenizer with this study's chat template.

    Returns:
        ``out_dir``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary(max_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return write_tokenizer_folder(
        tok, out_dir, chat_template=CHAT_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|pad|>",
        unk_token="<|unk|>", additional_special_tokens=[END_TOKEN],
    )


class Codec:
    """Token ids of observations and actions, straight from the vocabulary (the tokenizer is
    word-level over whitespace, so encoding piecewise equals encoding the rendered text)."""

    def __init__(self, max_size: int = 8) -> None:
        self.vocab = {w: i for i, w in enumerate(vocabulary(max_size))}
        self.action_ids = [self.vocab[a] for a in ACTIONS]
        self.end_id = self.vocab[END_TOKEN]
        self._action_of = {t: a for a, t in enumerate(self.action_ids)}

    def encode(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def first(self, desc: Sequence[str], state: int) -> list[int]:
        return self.encode(first_observation(desc, state))

    def step(self, state: int) -> list[int]:
        return self.encode(observation(state))

    def action_tokens(self, action: int) -> list[int]:
        return [self.action_ids[action], self.end_id]

    def action_of(self, token_id: int) -> Optional[int]:
        """The action a generated token names, or None (not an action token)."""
        return self._action_of.get(int(token_id))


def episode_tokens(ep: Episode, codec: Codec) -> tuple[list[int], list[int]]:
    """Token ids of an episode's conversation and ``1`` at the trained (action, end) tokens."""
    ids = codec.first(ep.desc, ep.states[0])
    mask = [0] * len(ids)
    for i, a in enumerate(ep.actions):
        ids += codec.action_tokens(a)
        mask += [1, 1]
        if i + 1 < len(ep.actions):
            obs = codec.step(ep.states[i + 1])
            ids += obs
            mask += [0] * len(obs)
    return ids, mask


@dataclass(frozen=True)
class DemoDataConfig:
    """How the demonstration data set is generated."""

    size: int = 4
    """Lake side length."""
    slippery: bool = False
    """Slippery transitions (Gymnasium's 1/3 - 1/3 - 1/3 rule by default)."""
    slip: float = GYM_SLIP
    """Total slip probability when slippery."""
    p_frozen: float = 0.8
    """Probability that a generated cell is frozen."""
    train_maps: int = 200
    """Distinct lakes the demonstrations are played on."""
    episodes_per_map: int = 4
    """Demonstrations recorded per lake."""
    epsilon: float = 0.0
    """Noisy demonstrator: probability of a random action."""
    keep_failures: bool = False
    """Keep demonstrations that did not reach the goal (default: only successful ones)."""
    max_steps: int = 24
    """Step cap of an episode (demonstrations and evaluation)."""
    seed: int = 0
    """Seed of the maps and demonstrations."""


def demonstrations(cfg: DemoDataConfig, maps: Sequence[Sequence[str]]) -> list[Episode]:
    """Play ``cfg.episodes_per_map`` demonstrations on every map."""
    rng = random.Random(cfg.seed * 7919 + 17)
    out = []
    for desc in maps:
        env = FrozenLake(desc, cfg.slippery, cfg.slip)
        demo = Demonstrator(env, cfg.epsilon)
        for _ in range(cfg.episodes_per_map):
            ep = rollout(env, demo.act, rng, cfg.max_steps)
            if ep.success or cfg.keep_failures:
                out.append(ep)
    return out


def write_jsonl(path: str, episodes: Sequence[Episode]) -> int:
    """Write episodes as ``{"messages": [...], "map": "...", "success": bool}`` lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for ep in episodes:
            rec = {"messages": episode_messages(ep), "map": "/".join(ep.desc), "success": ep.success}
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
    return len(episodes)


# -- evaluation ------------------------------------------------------------------------------

BatchPolicy = Callable[[list[list[int]]], list[Optional[int]]]
"""Given the token ids of each live episode so far, the next action of each (None: invalid)."""


@dataclass(frozen=True)
class EvalResult:
    episodes: int
    success_rate: float
    mean_return: float
    """Mean discounted return (0.99 per step): rewards reaching the goal sooner."""
    mean_steps: float
    invalid_rate: float
    """Fraction of episodes stopped by an output that is not an action."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _summarise(eps: Sequence[Episode], discount: float = 0.99) -> EvalResult:
    n = max(len(eps), 1)
    return EvalResult(
        episodes=len(eps),
        success_rate=sum(e.success for e in eps) / n,
        mean_return=sum(e.reward * discount ** (e.steps - 1) for e in eps if e.success) / n,
        mean_steps=sum(e.steps for e in eps) / n,
        invalid_rate=sum(e.invalid for e in eps) / n,
    )


def evaluate_batched(policy: BatchPolicy, maps: Sequence[Sequence[str]], *, slippery: bool,
                     slip: float = GYM_SLIP, episodes_per_map: int = 1, max_steps: int = 24,
                     seed: int = 0, codec: Optional[Codec] = None) -> EvalResult:
    """Play every map ``episodes_per_map`` times with a token-level policy, all episodes in
    lock-step (one batched policy call per step).

    The context of an episode is exactly its training conversation so far: the first
    observation, then per step the action token, ``<|end|>`` and the next observation.
    """
    codec = codec or Codec()
    rng = random.Random(seed)
    envs, eps, ctx, states = [], [], [], []
    for desc in maps:
        env = FrozenLake(desc, slippery, slip)
        for _ in range(episodes_per_map):
            envs.append(env)
            eps.append(Episode(env.desc, states=[env.start]))
            ctx.append(codec.first(env.desc, env.start))
            states.append(env.start)
    live = list(range(len(envs)))
    for _ in range(max_steps):
        if not live:
            break
        actions = policy([ctx[i] for i in live])
        still = []
        for i, a in zip(live, actions):
            if a is None:
                eps[i].invalid = True
                continue
            s, r, done = envs[i].step(states[i], a, rng)
            eps[i].actions.append(a)
            eps[i].states.append(s)
            states[i] = s
            if done:
                eps[i].reward = r
                continue
            ctx[i] = ctx[i] + codec.action_tokens(a) + codec.step(s)
            still.append(i)
        live = still
    return _summarise(eps)


def evaluate_state_policy(policy: Callable[[FrozenLake, int, random.Random], int],
                          maps: Sequence[Sequence[str]], *, slippery: bool, slip: float = GYM_SLIP,
                          episodes_per_map: int = 1, max_steps: int = 24,
                          seed: int = 0) -> EvalResult:
    """Play every map with a state-based ``policy(env, state, rng)`` (baselines)."""
    rng = random.Random(seed)
    eps = []
    for desc in maps:
        env = FrozenLake(desc, slippery, slip)
        for _ in range(episodes_per_map):
            eps.append(rollout(env, lambda s, g, env=env: policy(env, s, g), rng, max_steps))
    return _summarise(eps)


def random_policy(env: FrozenLake, state: int, rng: random.Random) -> int:
    return rng.randrange(4)


def optimal_policy_factory(epsilon: float = 0.0) -> Callable[[FrozenLake, int, random.Random], int]:
    """A state policy acting like :class:`Demonstrator` (demonstrators cached per map)."""
    cache: dict = {}

    def act(env: FrozenLake, state: int, rng: random.Random) -> int:
        key = (env.desc, env.slip)
        if key not in cache:
            cache[key] = Demonstrator(env, epsilon)
        return cache[key].act(state, rng)

    return act
