"""Frozen Lake environment, demonstrators and serialisation of the SFT-versus-IFT study."""

import random

import numpy as np
import pytest

from megatron_ift.studies import frozen_lake as fl

CLASSIC = ("SFFF", "FHFH", "FFFH", "HFFG")  # Gymnasium's 4x4 map


def test_generated_maps_are_seeded_and_solvable():
    for size in (4, 8):
        a = fl.generate_maps(30, size, seed=3)
        assert a == fl.generate_maps(30, size, seed=3)
        assert a != fl.generate_maps(30, size, seed=4)
        assert len(set(a)) == 30
        for m in a:
            assert len(m) == size and all(len(r) == size for r in m)
            assert m[0][0] == "S" and m[-1][-1] == "G"
            assert fl.has_path(m)
            assert np.isfinite(fl.shortest_distances(fl.FrozenLake(m))[0])
    held = fl.generate_maps(10, 4, seed=1)
    assert not set(fl.generate_maps(50, 4, seed=2, exclude=held)) & set(held)


def test_has_path_detects_blocked_lakes():
    assert not fl.has_path(("SH", "HG"))
    assert fl.has_path(("SF", "HG"))


def test_deterministic_transitions_and_borders():
    env = fl.FrozenLake(CLASSIC)
    assert env.P[0][fl.RIGHT] == [fl.Transition(1.0, 1, 0.0, False)]
    assert env.P[0][fl.DOWN] == [fl.Transition(1.0, 4, 0.0, False)]
    assert env.P[0][fl.LEFT] == [fl.Transition(1.0, 0, 0.0, False)]  # border: stay
    assert env.P[0][fl.UP] == [fl.Transition(1.0, 0, 0.0, False)]
    rng = random.Random(0)
    assert env.step(2, fl.RIGHT, rng) == (3, 0.0, False)


def test_hole_and_goal_terminate():
    env = fl.FrozenLake(CLASSIC)
    rng = random.Random(0)
    assert env.step(1, fl.DOWN, rng) == (5, 0.0, True)  # into the hole at (1, 1)
    assert env.step(14, fl.RIGHT, rng) == (15, 1.0, True)  # onto the goal
    for terminal in (5, 15):  # absorbing
        for a in range(4):
            assert env.P[terminal][a] == [fl.Transition(1.0, terminal, 0.0, True)]
    ep = fl.rollout(env, lambda s, g: fl.DOWN, rng, max_steps=50)
    assert ep.states == [0, 4, 8, 12] and not ep.success and ep.steps == 3  # hole at (3, 0)


def test_slippery_probabilities_match_gymnasium():
    env = fl.FrozenLake(CLASSIC, slippery=True)
    # From state 6 (row 1, col 2) moving RIGHT: right 1/3 -> 7 (hole), up 1/3 -> 2, down 1/3 -> 10.
    out = {t.next_state: t.prob for t in env.P[6][fl.RIGHT]}
    assert out == pytest.approx({7: 1 / 3, 2: 1 / 3, 10: 1 / 3})
    # From the start moving LEFT: left and up hit the border (stay, 2/3), down 1/3.
    out = {t.next_state: t.prob for t in env.P[0][fl.LEFT]}
    assert out == pytest.approx({0: 2 / 3, 4: 1 / 3})
    for s in range(env.num_states):
        for a in range(4):
            assert sum(t.prob for t in env.P[s][a]) == pytest.approx(1.0)
    # Sampled frequencies follow the table.
    rng = random.Random(1)
    counts = {}
    for _ in range(6000):
        nxt, _, _ = env.step(6, fl.RIGHT, rng)
        counts[nxt] = counts.get(nxt, 0) + 1
    for s in (7, 2, 10):
        assert counts[s] / 6000 == pytest.approx(1 / 3, abs=0.03)
    custom = fl.FrozenLake(CLASSIC, slippery=True, slip=0.2)
    assert {t.next_state: t.prob for t in custom.P[9][fl.DOWN]} == pytest.approx(
        {13: 0.8, 8: 0.1, 10: 0.1})


def test_optimal_demonstrator_follows_shortest_paths():
    for m in fl.generate_maps(20, 4, seed=5) + fl.generate_maps(5, 8, seed=5):
        env = fl.FrozenLake(m)
        demo = fl.Demonstrator(env)
        dist = fl.shortest_distances(env)
        rng = random.Random(0)
        for _ in range(3):
            ep = fl.rollout(env, demo.act, rng, max_steps=200)
            assert ep.success and ep.steps == dist[env.start]
        for s in range(env.num_states):  # every optimal action shortens the distance by one
            if env.is_terminal(s) or not np.isfinite(dist[s]):
                continue
            for a in demo.best[s]:
                assert dist[env.P[s][a][0].next_state] == dist[s] - 1


def test_slippery_value_iteration_beats_random_and_greedy_paths():
    env = fl.FrozenLake(CLASSIC, slippery=True)
    V, _ = fl.value_iteration(env, discount=1.0 - 1e-9, tol=1e-12)
    assert V[0] == pytest.approx(0.8235, abs=2e-3)  # the known optimum of Gymnasium's 4x4 lake
    maps = [CLASSIC]
    kw = dict(slippery=True, episodes_per_map=400, max_steps=100, seed=0)
    opt = fl.evaluate_state_policy(fl.optimal_policy_factory(), maps, **kw)
    rnd = fl.evaluate_state_policy(fl.random_policy, maps, **kw)
    assert opt.success_rate > 0.6 > 0.1 > rnd.success_rate


def test_noisy_demonstrator_takes_random_actions():
    env = fl.FrozenLake(CLASSIC)
    demo = fl.Demonstrator(env, epsilon=1.0)
    rng = random.Random(0)
    acts = [demo.act(0, rng) for _ in range(400)]
    assert set(acts) == {0, 1, 2, 3}
    assert all(fl.Demonstrator(env, 0.0).act(0, rng) in (fl.DOWN, fl.RIGHT) for _ in range(20))
    with pytest.raises(ValueError):
        fl.Demonstrator(env, epsilon=1.5)


def test_conversation_tokens_match_the_chat_pipeline(tmp_path):
    from megatron_ift.data import load_tokenizer
    from megatron_ift.data.chat import ChatEncoder

    tok = load_tokenizer(fl.write_tokenizer(str(tmp_path / "tok")))
    assert len(tok) == len(fl.vocabulary())
    cfg = fl.DemoDataConfig(train_maps=5, episodes_per_map=2, epsilon=0.3, seed=2)
    episodes = fl.demonstrations(cfg, fl.generate_maps(5, 4, seed=2))
    codec = fl.Codec()
    encoder = ChatEncoder(tok, tok.chat_template)
    for ep in episodes:
        msgs = fl.episode_messages(ep)
        assert msgs[0]["content"].startswith("map S ")
        enc = encoder.encode([msgs])[0]
        # The evaluation context is built piecewise; it must equal what training saw.
        ids = codec.first(ep.desc, ep.states[0])
        for i, a in enumerate(ep.actions):
            ids += codec.action_tokens(a)
            if i + 1 < len(ep.actions):
                ids += codec.step(ep.states[i + 1])
        assert ids == enc.input_ids
        # Trained tokens: exactly the actions and their end-of-turn tokens.
        trained = [t for t, m in zip(enc.input_ids, enc.assistant_mask) if m]
        assert trained == [t for a in ep.actions for t in codec.action_tokens(a)]
        assert [codec.action_of(t) for t in trained[::2]] == ep.actions


def test_batched_evaluation_with_a_scripted_policy():
    codec = fl.Codec()
    maps = fl.generate_maps(10, 4, seed=9)
    demos = {m: fl.Demonstrator(fl.FrozenLake(m)) for m in maps}
    vocab_inv = {i: w for w, i in codec.vocab.items()}

    def policy(contexts):  # reads the map and position back from the tokens, acts optimally
        out = []
        for ctx in contexts:
            words = [vocab_inv[t] for t in ctx]
            cells = [w for w in words[1: words.index("pos")] if w != "/"]
            desc = tuple("".join(cells[r * 4:(r + 1) * 4]) for r in range(4))
            out.append(demos[desc].best[int(words[-1])][0])
        return out

    res = fl.evaluate_batched(policy, maps, slippery=False, max_steps=24, codec=codec)
    assert res.success_rate == 1.0 and res.invalid_rate == 0.0
    bad = fl.evaluate_batched(lambda c: [None] * len(c), maps, slippery=False, max_steps=24)
    assert bad.success_rate == 0.0 and bad.invalid_rate == 1.0
