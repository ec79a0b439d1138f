"""Where a resume puts the number of Adam updates: per parameter for torch's Adam/AdamW, in the
param groups for fused optimizers (review finding 3: Transformer Engine's FusedAdam rejects a
per-parameter ``step`` at its next ``state_dict``, the first save after every resume)."""

import pytest
import torch

from megatron_ift.mcore_compat import restore_adam_steps


class FusedAdamStateContract(torch.optim.Optimizer):
    """The state contract of Transformer Engine's FusedAdam (transformer_engine/pytorch/
    optimizers/fused_adam.py), not its kernels: the step count lives in ``group["step"]``;
    ``state_dict`` converts each per-parameter state entry by name through a dtype table, so any
    other entry raises ``KeyError``."""

    name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                         "master_param": torch.float32}

    def __init__(self, params):
        super().__init__(params, dict(lr=1e-3))

    def step(self):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            for p in group["params"]:
                st = self.state[p]
                st.setdefault("exp_avg", torch.zeros_like(p))
                st.setdefault("exp_avg_sq", torch.zeros_like(p))

    def state_dict(self):
        out = super().state_dict()
        for entry in out["state"].values():
            for name in list(entry):
                entry[name] = entry[name].to(self.name_to_dtype_map[name])  # KeyError: 'step'
        return out


class Wrapped:  # the shape of a megatron-core optimizer: .optimizer is the torch one
    def __init__(self, opt):
        self.optimizer = opt


def test_fused_adam_gets_its_step_in_the_param_groups():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamStateContract([p])
    opt.step()
    restore_adam_steps(Wrapped(opt), 7)
    assert opt.param_groups[0]["step"] == 7
    assert "step" not in opt.state[p]
    opt.state_dict()  # the save after a resume (raised KeyError('step') before the fix)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_torch_adam_gets_a_step_tensor_per_parameter(cls):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = cls([a, b], lr=1e-3)
    (a.sum() + b.sum()).backward()
    opt.step()
    restore_adam_steps(Wrapped(opt), 5)
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 5.0
    assert opt.state[a]["step"] is not opt.state[b]["step"]  # AdamW increments in place
