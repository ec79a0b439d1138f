"""Run a GPT model's output layer on selected positions only (both passes of the step).

The estimation pass needs logits only where an estimate is used, and the loss only where it is
trained: answer positions (``loss_mask = 1``) in both cases. Prompt and padding positions still
go through every transformer layer (attention is causal), but skipping them in the output layer
saves that share of the largest GEMM (forward and both backward GEMMs), of the vocab-sized
log-softmax / estimator work, and shrinks the logits buffer (and its gradient) to the trained
tokens.

Mechanism: a forward pre-hook on megatron-core's ``output_layer`` (a ``ColumnParallelLinear``)
replaces its input ``[s, b, h]`` with the selected rows ``[n, 1, h]``; the model then returns
logits ``[1, n, v/tp]``. Under sequence parallelism the input is ``[s/tp, b, h]``: the hook
all-gathers it first and the layer's own gather is switched off for that call (megatron-core
does the same when it materialises only the last token's logits for inference).

Gradients: the selection is an ``index_select`` (its backward scatters into zeros at the
unselected rows). Without SP the layer's own backward all-reduces the input gradient over TP as
usual. With SP the layer's sequence-parallel flag is off for the call, so megatron-core routes
its input through ``copy_to_tensor_model_parallel_region`` (all-reduce backward); the hook's
all-gather therefore only splits the gradient back to this rank's sequence shard
(``tensor_parallel_output_grad=False``), not reduce-scatter it a second time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


@dataclass(frozen=True)
class PositionSelection:
    """Selected ``(row, col)`` entries of a ``[b, s]`` micro-batch, in row-major order."""

    rows: torch.Tensor  # [n] long
    cols: torch.Tensor  # [n] long
    shape: tuple[int, int]  # (b, s)
    empty: bool  # nothing was selected; one dummy entry (0, 0) stands in

    @staticmethod
    def from_mask(mask: torch.Tensor) -> "PositionSelection":
        """The entries where ``mask [b, s]`` is non-zero (one dummy entry if there are none,
        so every rank still runs the same collectives)."""
        rows, cols = mask.bool().nonzero(as_tuple=True)
        empty = rows.numel() == 0
        if empty:
            rows = torch.zeros(1, dtype=torch.long, device=mask.device)
            cols = torch.zeros(1, dtype=torch.long, device=mask.device)
        return PositionSelection(rows=rows, cols=cols, shape=tuple(mask.shape), empty=empty)

    def seq_first_index(self) -> torch.Tensor:
        """Flat indices of the entries in a ``[s, b]`` (Megatron sequence-first) layout."""
        return self.cols * self.shape[0] + self.rows

    def scatter_grad(self, values: torch.Tensor) -> torch.Tensor:
        """``values [n]`` placed in a zero ``[b, s]`` tensor, differentiably.

        An empty selection (an all-prompt micro-batch) still returns a result connected to
        ``values``' graph (with zero gradient), so the schedule's backward has a graph to run.
        """
        out = values.new_zeros(self.shape)
        if self.empty:
            return out + values.sum() * 0.0
        return out.index_put((self.rows, self.cols), values)

    def scatter(self, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """``fill [b, s]`` with ``values [n]`` written at the selected entries (copy)."""
        out = fill.clone()
        if not self.empty:
            out[self.rows, self.cols] = values.to(out.dtype)
        return out


@contextlib.contextmanager
def selected_output_positions(model: torch.nn.Module, selection: PositionSelection, tp_group) -> Iterator[None]:
    """Within the block, ``model``'s output layer sees only ``selection``'s positions.

    Works with and without gradients (see the module docstring for the TP / SP backward).

    Args:
        model: a bare megatron-core ``GPTModel`` with ``post_process``.
        selection: the ``(row, col)`` entries of the micro-batch to keep.
        tp_group: the tensor-parallel group (the SP all-gather runs over it).

    Yields:
        Nothing; the model's logits come back as ``[1, n, v/tp]`` in ``selection`` order.
    """
    layer = model.output_layer
    sequence_parallel = layer.sequence_parallel
    index = selection.seq_first_index()

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input_")
        if sequence_parallel:
            # The layer all-reduces its input gradient (see the module docstring): split only.
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=tp_group
            )
        s, b, h = hidden.shape
        if (b, s) != selection.shape:
            raise RuntimeError(
                f"output layer input covers (b, s) = {(b, s)} but the selection was built for "
                f"{selection.shape}"
            )
        picked = hidden.reshape(s * b, h).index_select(0, index).unsqueeze(1)  # [n, 1, h]
        return (picked,) + tuple(args[1:]), kwargs

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    layer.sequence_parallel = False
    try:
        yield
    finally:
        layer.sequence_parallel = sequence_parallel
        handle.remove()


@dataclass
class OutputLayerInputs:
    """What :func:`fused_output_positions` captured (set during the model's forward)."""

    hidden: Optional[torch.Tensor] = None  # [n, h], TP-reduced in backward (see the function)
    weight: Optional[torch.Tensor] = None  # [v/tp, h]: the output layer's or the tied embedding's


@contextlib.contextmanager
def fused_output_positions(
    model: torch.nn.Module, selection: PositionSelection, tp_group
) -> Iterator[OutputLayerInputs]:
    """Within the block, ``model``'s output layer is skipped: its selected inputs are captured.

    For :func:`megatron_ift.ift.logprobs.linear_label_logprobs`, which runs the output layer
    fused with the log-probs, in chunks. The yielded :class:`OutputLayerInputs` holds, after
    the forward, the hidden states at ``selection``'s positions ``[n, h]`` and the weight the
    layer would have used. The layer itself sees ``[0, 1, h]`` (no GEMM; the model returns an
    empty ``[1, 0, v/tp]`` that the loss ignores, so autograd never visits the layer).

    Backward reduction over TP (what the output layer would have done): without sequence
    parallelism the captured rows pass through ``copy_to_tensor_model_parallel_region``
    (identity forward, all-reduce backward); with SP the all-gather's backward
    reduce-scatters (the layer, which is skipped, reduces nothing here).

    Args:
        model: a bare megatron-core ``GPTModel`` with ``post_process`` and a bias-free output
            layer.
        selection: the ``(row, col)`` entries of the micro-batch to keep.
        tp_group: the tensor-parallel group.
    """
    layer = model.output_layer
    if getattr(layer, "bias", None) is not None:
        raise ValueError("fused_output_positions needs a bias-free output layer")
    sequence_parallel = layer.sequence_parallel
    index = selection.seq_first_index()
    captured = OutputLayerInputs()

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input_")
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
        s, b, h = hidden.shape
        if (b, s) != selection.shape:
            raise RuntimeError(
                f"output layer input covers (b, s) = {(b, s)} but the selection was built for "
                f"{selection.shape}"
            )
        picked = hidden.reshape(s * b, h).index_select(0, index)  # [n, h]
        if not sequence_parallel:
            picked = copy_to_tensor_model_parallel_region(picked, group=tp_group)
        captured.hidden = picked
        weight = kwargs.get("weight")
        captured.weight = module.weight if weight is None else weight
        empty = torch.empty(0, 1, h, dtype=hidden.dtype, device=hidden.device)
        return (empty,) + tuple(args[1:]), kwargs

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    layer.sequence_parallel = False
    try:
        yield captured
    finally:
        layer.sequence_parallel = sequence_parallel
        handle.remove()
