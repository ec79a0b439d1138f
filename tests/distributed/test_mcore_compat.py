"""Each work-around of megatron_ift.mcore_compat against the megatron-core behaviour it exists
for. These tests assert the *upstream* behaviour (observed without the work-around, in one
process with the distributed optimizer): when a megatron-core upgrade fixes or changes it, the
matching test fails, and the work-around is to be removed or adapted."""

import json
import os

import pytest
from _infra.forkserver import ROOT, run


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    d = tmp_path_factory.mktemp("mcore")
    out = d / "found.json"
    proc = run([os.path.join(ROOT, "tests", "_infra", "workers", "mcore_compat_upstream.py"),
                           str(d), str(out)], timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_distrib_optim_sharding_default_fails_on_save(upstream):
    """DISTRIB_OPTIM_SHARDING: the default type (fully_sharded_model_space) cannot be saved."""
    assert upstream["save_default_sharding"].startswith("CheckpointingException")
    assert "flattened_range is not supported" in upstream["save_default_sharding"]


def test_init_optimizer_state_fresh_state_dict_asserts(upstream):
    """init_optimizer_state: DistributedOptimizer.state_dict asserts one Adam step over all
    parameters, which a fresh optimizer has none of."""
    assert upstream["fresh_state_dict"].startswith("AssertionError")


def test_load_optimizer_state_one_call_fails(upstream):
    """load_optimizer_state: one load_state_dict call with the fully reshardable parameter state
    fails on the entries' missing 'step'."""
    assert upstream["param_state_entries_have_step"] is False
    assert upstream["one_call_load"] == "KeyError: 'step'"


def test_restore_adam_steps_load_shares_one_step_tensor(upstream):
    """restore_adam_steps: after load_state_dict every parameter's 'step' is one shared tensor,
    which torch's AdamW would advance once per parameter."""
    assert upstream["step_entries"] > 1 and upstream["distinct_step_tensors"] == 1


def test_checkpoint_children_hooks_exist_and_are_wrapped(upstream):
    """make_checkpoint_children_die_with_parent: the two hooks it wraps are still megatron-core's
    way of starting writers and the results manager (renamed hooks would silently go unwrapped)."""
    assert upstream["writer_hook"] and upstream["queue_hook"]
    assert upstream["writer_wrapped"] is True
