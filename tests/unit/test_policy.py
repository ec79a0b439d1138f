"""When the trainer evaluates, saves and stops (megatron_ift.training.policy.after_step)."""

import pytest

from megatron_ift.config_io import from_dict, load_yaml
from megatron_ift.training.config import RunConfig
from megatron_ift.training.policy import after_step

DEMO = "configs/demo.yaml"


def _cfg(**sections) -> RunConfig:
    data = load_yaml(DEMO)
    data["optimizer"]["lr_warmup_steps"] = 1
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(RunConfig, data)


def _plan(cfg, start=0, has_eval=True):
    return {s: after_step(cfg, s, start_step=start, has_eval=has_eval)
            for s in range(start + 1, cfg.train.steps + 1)}


def test_interval_saves_before_the_end_and_once_at_the_end():
    cfg = _cfg(train={"steps": 10, "eval_interval": 4, "exit_after_steps": 0},
               checkpoint={"save_interval": 5, "save_on_exit": True})
    plan = _plan(cfg)
    assert [s for s, a in plan.items() if a.save] == [5, 10]
    assert [s for s, a in plan.items() if a.evaluate] == [4, 8]
    assert [s for s, a in plan.items() if a.stop] == [10] and plan[10].complete
    assert not any(a.evaluate for a in _plan(cfg, has_eval=False).values())


def test_no_save_on_exit_keeps_the_interval_off_the_last_step():
    cfg = _cfg(train={"steps": 10, "exit_after_steps": 0},
               checkpoint={"save_interval": 5, "save_on_exit": False})
    assert [s for s, a in _plan(cfg).items() if a.save] == [5]


@pytest.mark.parametrize("start", [0, 3])
def test_exit_after_steps_saves_once_and_stops_early(start):
    cfg = _cfg(train={"steps": 10, "exit_after_steps": 2},
               checkpoint={"save_interval": 5, "save_on_exit": True})
    plan = _plan(cfg, start=start)
    stop = start + 2
    assert plan[stop].stop and plan[stop].save and not plan[stop].complete
    assert [s for s, a in plan.items() if a.stop and s <= stop] == [stop]


def test_exit_after_steps_at_an_interval_step_saves_once():
    cfg = _cfg(train={"steps": 10, "exit_after_steps": 5}, checkpoint={"save_interval": 5})
    a = after_step(cfg, 5, start_step=0, has_eval=False)
    assert a.save and a.stop and not a.complete
