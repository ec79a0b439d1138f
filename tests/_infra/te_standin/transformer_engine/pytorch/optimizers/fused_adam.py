"""``FusedAdam``: Adam / AdamW in plain PyTorch, with TE's state contract.

The step count lives in each param group (``group["step"]``, incremented before the update);
per-parameter state holds only ``exp_avg``, ``exp_avg_sq`` (and ``master_param`` with
``master_weights``). ``state_dict`` converts every per-parameter entry by name through
``name_to_dtype_map`` and so raises ``KeyError`` for any other name (a per-parameter ``step``),
as TE's does. ``adam_w_mode=True`` decouples the weight decay (AdamW); ``False`` adds it to the
gradient (L2).
"""

from __future__ import annotations

import torch


class FusedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas=(0.9, 0.999), eps: float = 1e-8, adam_w_mode: bool = True,
                 weight_decay: float = 0.0, amsgrad: bool = False, set_grad_none: bool = True,
                 capturable: bool = False, master_weights: bool = False,
                 master_weight_dtype=torch.float32, exp_avg_dtype=torch.float32,
                 exp_avg_sq_dtype=torch.float32, use_decoupled_grad: bool = False,
                 store_param_remainders: bool = False, **kwargs):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        if capturable or master_weights or store_param_remainders:
            raise NotImplementedError("capturable / master_weights / store_param_remainders are not "
                                      "covered by the Transformer Engine stand-in")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode
        self.use_decoupled_grad = use_decoupled_grad
        self.name_to_dtype_map = {"exp_avg": exp_avg_dtype, "exp_avg_sq": exp_avg_sq_dtype,
                                  "master_param": master_weight_dtype}

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            step = group["step"]
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            c1 = 1 - beta1 ** step if group["bias_correction"] else 1.0
            c2 = 1 - beta2 ** step if group["bias_correction"] else 1.0
            for p in group["params"]:
                grad = p.decoupled_grad if self.use_decoupled_grad else p.grad
                if grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.name_to_dtype_map["exp_avg"])
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.name_to_dtype_map["exp_avg_sq"])
                g = grad.float()
                pf = p.float()
                if not self.adam_w_mode and wd:
                    g = g + wd * pf
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (st["exp_avg"] / c1) / ((st["exp_avg_sq"] / c2).sqrt() + eps)
                if self.adam_w_mode and wd:
                    update = update + wd * pf
                p.copy_((pf - lr * update).to(p.dtype))
        return loss

    def state_dict(self):
        out = super().state_dict()
        for entry in out["state"].values():
            for name in list(entry):
                entry[name] = entry[name].to(self.name_to_dtype_map[name])
        return out
