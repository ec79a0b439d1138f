"""TE's modules: ``Linear``, ``LayerNormLinear``, ``LayerNorm``, ``RMSNorm`` (and
``GroupedLinear``, not covered).

Constructor arguments are TE's (megatron-core passes ``in_features``, ``out_features``,
``sequence_parallel``, ``fuse_wgrad_accumulation``, ``tp_group``, ``tp_size``,
``get_rng_state_tracker``, ``init_method``, ``bias``, ``return_bias``, ``parallel_mode``,
``params_dtype``, ``device``, ``rng_tracker_name`` and, for ``LayerNormLinear``, ``eps``,
``normalization``, ``zero_centered_gamma``, ``return_layernorm_output``). Semantics as TE
documents them:

* ``parallel_mode="column"``: the weight holds ``out_features / tp`` rows; the input is
  all-gathered along the sequence first with ``sequence_parallel`` (its gradient
  reduce-scattered), else its gradient is all-reduced over the TP group.
* ``parallel_mode="row"``: the weight holds ``in_features / tp`` columns; the output is
  reduce-scattered along the sequence with ``sequence_parallel``, else all-reduced; the bias is
  added after that (and its parameter marked ``sequence_parallel`` so megatron all-reduces its
  gradient).
* ``return_bias``: the bias is not added but returned beside the output.
* ``fuse_wgrad_accumulation``: the weight gradient is added to ``weight.main_grad`` in the
  backward (``grad_added_to_main_grad`` set where the attribute exists) and a dummy gradient is
  returned, as TE does; megatron's DDP then skips its own accumulation.
* norms compute in fp32 and return the input dtype; ``zero_centered_gamma`` scales by
  ``1 + weight``; their parameters carry ``sequence_parallel``.
* FP8 (inside ``fp8_autocast``): the GEMM's input and weight are cast (quantize-dequantize) with
  the recipe's forward format and scales, the output gradient with its backward format; TE's
  FP8 shape rule is asserted.
"""

from __future__ import annotations

import io
import pickle
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.parameter import Parameter

from transformer_engine.pytorch import _comm
from transformer_engine.pytorch.fp8 import (
    FP8GlobalStateManager,
    ScalingMeta,
    assert_dim_for_fp8_exec,
    cast_forward,
    cast_gradient,
)

_IGNORED_FALSY = ("ub_overlap_ag", "ub_overlap_rs", "ub_overlap_rs_dgrad", "ub_bulk_wgrad",
                  "ub_bulk_dgrad", "ub_split_ag", "ub_split_rs", "ub_atomic_gemm_ag",
                  "ub_atomic_gemm_rs", "delay_wgrad_compute", "symmetric_ar_type", "ub_name")


def _check_unsupported(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key in _IGNORED_FALSY:
            if value and key not in ("ub_name",):
                raise NotImplementedError(f"the Transformer Engine stand-in does not cover {key}={value!r}")
            continue
        raise TypeError(f"unexpected keyword argument {key!r} (not part of TE's signature as the stand-in knows it)")


def _device(device):
    """A device for the parameters: ``"cuda"``, a CUDA ordinal or device (TE's default: the
    current CUDA device), or ``"cpu"``."""
    if device is None or isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cuda"
    if isinstance(device, torch.device) and device.type == "cuda":
        return device
    return torch.device(device)


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
          kind: str, zero_centered_gamma: bool) -> torch.Tensor:
    xf = x.float()
    w = weight.float() + 1.0 if zero_centered_gamma else weight.float()
    if kind == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
    elif kind == "LayerNorm":
        y = F.layer_norm(xf, (xf.shape[-1],), w, None if bias is None else bias.float(), eps)
    else:
        raise ValueError(f"normalization={kind!r}: 'LayerNorm' or 'RMSNorm'")
    return y.to(x.dtype)


class _GEMM(torch.autograd.Function):
    """``x @ w.T`` whose weight gradient goes to ``w.main_grad`` with fused accumulation."""

    @staticmethod
    def forward(ctx, x, w, fuse_wgrad, w_param):
        ctx.save_for_backward(x, w)
        ctx.fuse_wgrad, ctx.w_param = fuse_wgrad, w_param
        return torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        dx = torch.matmul(grad, w)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])
        dw = torch.matmul(g2.t(), x2)
        if ctx.fuse_wgrad:
            param = ctx.w_param
            if not hasattr(param, "main_grad"):
                raise RuntimeError("fuse_wgrad_accumulation=True needs weight.main_grad "
                                   "(megatron's DDP allocates it)")
            param.main_grad.add_(dw.to(param.main_grad.dtype))
            if hasattr(param, "grad_added_to_main_grad"):
                param.grad_added_to_main_grad = True
            dw = torch.zeros_like(w) if getattr(param, "zero_out_wgrad", False) else torch.empty_like(w)
        return dx, dw, None, None


class _FP8Metas:
    def __init__(self) -> None:
        self.input, self.weight, self.grad_output = ScalingMeta(), ScalingMeta(), ScalingMeta()


class Linear(torch.nn.Module):
    """``transformer_engine.pytorch.Linear``."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 device="cuda", **kwargs):
        super().__init__()
        _check_unsupported(kwargs)
        self._init_linear(in_features, out_features, sequence_parallel, fuse_wgrad_accumulation,
                          tp_group, tp_size, get_rng_state_tracker, rng_tracker_name, init_method,
                          bias, return_bias, params_dtype, parallel_mode, device)
        self.reset_linear_parameters()

    def _init_linear(self, in_features, out_features, sequence_parallel, fuse_wgrad_accumulation,
                     tp_group, tp_size, get_rng_state_tracker, rng_tracker_name, init_method, bias,
                     return_bias, params_dtype, parallel_mode, device) -> None:
        if parallel_mode not in (None, "column", "row"):
            raise ValueError(f"parallel_mode={parallel_mode!r}: None, 'column' or 'row'")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.tp_size = tp_group, tp_size if tp_group is None else _comm.world(tp_group)
        self.parallel_mode = parallel_mode
        self.sequence_parallel = sequence_parallel and parallel_mode is not None
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.get_rng_state_tracker, self.rng_tracker_name = get_rng_state_tracker, rng_tracker_name
        self.init_method = init_method
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.params_dtype = params_dtype or torch.get_default_dtype()
        if parallel_mode == "column":
            if out_features % self.tp_size:
                raise ValueError(f"out_features={out_features} not divisible by tp_size={self.tp_size}")
            self.out_features = out_features // self.tp_size
        elif parallel_mode == "row":
            if in_features % self.tp_size:
                raise ValueError(f"in_features={in_features} not divisible by tp_size={self.tp_size}")
            self.in_features = in_features // self.tp_size
        dev = _device(device)
        self.weight = Parameter(torch.empty(self.out_features, self.in_features, dtype=self.params_dtype, device=dev))
        if parallel_mode is not None:
            self.weight.tensor_model_parallel = True
            self.weight.partition_dim = 0 if parallel_mode == "column" else 1
            self.weight.partition_stride = 1
        if bias:
            self.bias = Parameter(torch.empty(self.out_features, dtype=self.params_dtype, device=dev))
            if parallel_mode == "column":
                self.bias.tensor_model_parallel = True
                self.bias.partition_dim = 0
                self.bias.partition_stride = 1
            elif parallel_mode == "row" and self.sequence_parallel:
                self.bias.sequence_parallel = True
        else:
            self.register_parameter("bias", None)
        self.fp8_meta = _FP8Metas()
        # TE >= 2.6: save the high-precision input instead of its FP8 copy for the backward (the
        # stand-in keeps the dequantized copy either way; megatron-core sets it on linear_proj).
        self.save_original_input = False

    def reset_linear_parameters(self) -> None:
        if self.init_method is not None:
            tracker = self.get_rng_state_tracker
            if tracker is not None and self.parallel_mode is not None:
                with tracker().fork(self.rng_tracker_name) if self.rng_tracker_name else tracker().fork():
                    self.init_method(self.weight)
            else:
                self.init_method(self.weight)
        else:
            torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def _linear(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The GEMM with TE's communication; ``x`` is this rank's input (a sequence shard under
        sequence parallelism for a column layer)."""
        group = self.tp_group
        fp8 = FP8GlobalStateManager.is_fp8_enabled()
        if self.parallel_mode == "column":
            x = _comm.gather_sequence(x, group) if self.sequence_parallel else _comm.copy_to_tp(x, group)
        w = self.weight
        if x.dtype != w.dtype:
            raise TypeError(f"TE Linear: input dtype {x.dtype} differs from the weight's {w.dtype} "
                            "(TE casts only inside autocast)")
        if fp8:
            assert_dim_for_fp8_exec(x, w)
            x = cast_forward(x, self.fp8_meta.input)
            w = cast_forward(w, self.fp8_meta.weight)
        y = _GEMM.apply(x, w, self.fuse_wgrad_accumulation, self.weight)
        if fp8:
            y = cast_gradient(y, self.fp8_meta.grad_output)
        if self.parallel_mode == "row":
            y = _comm.scatter_sequence(y, group) if self.sequence_parallel else _comm.all_reduce(y, group)
        if self.apply_bias:
            y = y + self.bias
        return y, (self.bias if self.return_bias else None)

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, **_kw):
        out, bias = self._linear(inp)
        return (out, bias) if self.return_bias else out

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group = tp_group

    # -- checkpointed FP8 state (TE's ``_extra_state``) ------------------------------------------

    def get_extra_state(self) -> torch.Tensor:
        """The delayed-scaling state (amax histories, scales) serialised into a uint8 tensor, as
        TE 2.x saves it; an empty tensor when there is none."""
        roles = {name: getattr(self.fp8_meta, name) for name in ("input", "weight", "grad_output")}
        state = {name: ([h.detach().cpu() for h in m.history], None if m.scale is None else m.scale.detach().cpu(),
                        m.fp8_max) for name, m in roles.items() if m.history}
        if not state:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Restore :meth:`get_extra_state`'s tensor (None, an empty tensor or ``io.BytesIO`` of a
        checkpoint without FP8 state leave the state as it is)."""
        if state is None:
            return
        if isinstance(state, io.BytesIO):
            state.seek(0)
            raw = state.read()
        elif isinstance(state, torch.Tensor):
            if state.numel() == 0:
                return
            raw = bytes(state.detach().cpu().numpy().tobytes())
        else:
            raise TypeError(f"unexpected extra state {type(state).__name__}")
        if not raw:
            return
        dev = self.weight.device
        for name, (history, scale, fp8_max) in pickle.loads(raw).items():
            meta = getattr(self.fp8_meta, name)
            meta.history = [h.to(dev) for h in history]
            meta.scale = None if scale is None else scale.to(dev)
            meta.fp8_max = fp8_max
            meta.recipe = None  # set again at the next cast


class LayerNormLinear(Linear):
    """``transformer_engine.pytorch.LayerNormLinear``: a norm (parameters ``layer_norm_weight``,
    ``layer_norm_bias``) fused before a ``Linear``."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5,
                 sequence_parallel: bool = False, fuse_wgrad_accumulation: bool = False, tp_group=None,
                 tp_size: int = 1, get_rng_state_tracker: Optional[Callable] = None,
                 rng_tracker_name: Optional[str] = None, init_method: Optional[Callable] = None,
                 bias: bool = True, normalization: str = "LayerNorm", return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 return_layernorm_output: bool = False, return_layernorm_output_gathered: bool = False,
                 zero_centered_gamma: bool = False, device="cuda", **kwargs):
        torch.nn.Module.__init__(self)
        _check_unsupported(kwargs)
        if parallel_mode == "row":
            raise ValueError("LayerNormLinear: parallel_mode='row' is not supported (as in TE)")
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={normalization!r}: 'LayerNorm' or 'RMSNorm'")
        self.eps, self.normalization, self.zero_centered_gamma = eps, normalization, zero_centered_gamma
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = return_layernorm_output_gathered
        self._init_linear(in_features, out_features, sequence_parallel, fuse_wgrad_accumulation,
                          tp_group, tp_size, get_rng_state_tracker, rng_tracker_name, init_method,
                          bias, return_bias, params_dtype, parallel_mode, device)
        dev = self.weight.device
        self.layer_norm_weight = Parameter(torch.empty(in_features, dtype=self.params_dtype, device=dev))
        self.layer_norm_weight.sequence_parallel = self.sequence_parallel
        if normalization == "LayerNorm":
            self.layer_norm_bias = Parameter(torch.empty(in_features, dtype=self.params_dtype, device=dev))
            self.layer_norm_bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("layer_norm_bias", None)
        self.reset_layer_norm_parameters()
        self.reset_linear_parameters()

    def reset_layer_norm_parameters(self) -> None:
        with torch.no_grad():
            (self.layer_norm_weight.zero_() if self.zero_centered_gamma else self.layer_norm_weight.fill_(1.0))
            if self.layer_norm_bias is not None:
                self.layer_norm_bias.zero_()

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, **_kw):
        ln_out = _norm(inp, self.layer_norm_weight, self.layer_norm_bias, self.eps, self.normalization,
                       self.zero_centered_gamma)
        out, bias = self._linear(ln_out)
        result = [out]
        if self.return_bias:
            result.append(bias)
        if self.return_layernorm_output:
            if self.return_layernorm_output_gathered and self.sequence_parallel:
                ln_out = _comm.gather_sequence(ln_out, self.tp_group)
            result.append(ln_out)
        return result[0] if len(result) == 1 else tuple(result)


class _Norm(torch.nn.Module):
    KIND = ""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 params_dtype: Optional[torch.dtype] = None, zero_centered_gamma: bool = False,
                 device="cuda", **kwargs):
        super().__init__()
        _check_unsupported({k: v for k, v in kwargs.items() if k not in ("sm_margin",)})
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        dtype = params_dtype or torch.get_default_dtype()
        dev = _device(device)
        self.weight = Parameter(torch.empty(hidden_size, dtype=dtype, device=dev))
        self.weight.sequence_parallel = sequence_parallel
        if self.KIND == "LayerNorm":
            self.bias = Parameter(torch.empty(hidden_size, dtype=dtype, device=dev))
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_() if self.zero_centered_gamma else self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm(x, self.weight, self.bias, self.eps, self.KIND, self.zero_centered_gamma)


class LayerNorm(_Norm):
    """``transformer_engine.pytorch.LayerNorm``."""

    KIND = "LayerNorm"


class RMSNorm(_Norm):
    """``transformer_engine.pytorch.RMSNorm``."""

    KIND = "RMSNorm"


class GroupedLinear(torch.nn.Module):
    """Not covered (MoE): refused when built."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("the Transformer Engine stand-in does not cover GroupedLinear (MoE)")
