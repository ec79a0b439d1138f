"""Run a GPT model's output layer on selected positions only (estimation pass).

The estimation pass needs logits only where an estimate is used: answer positions
(``loss_mask = 1``). Prompt and padding positions still go through every transformer layer
(attention is causal), but skipping them in the output layer saves that share of the largest
GEMM and of the vocab-sized estimator work, and shrinks the logits buffer to the trained tokens.

Mechanism: a forward pre-hook on megatron-core's ``output_layer`` (a ``ColumnParallelLinear``)
replaces its input ``[s, b, h]`` with the selected rows ``[n, 1, h]``; the model then returns
logits ``[1, n, v/tp]``. Under sequence parallelism the input is ``[s/tp, b, h]``: the hook
all-gathers it first and the layer's own gather is switched off for that call (megatron-core
does the same when it materialises only the last token's logits for inference). Forward-only:
the hook refuses to run with gradients enabled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


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

    def scatter(self, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """``fill [b, s]`` with ``values [n]`` written at the selected entries (copy)."""
        out = fill.clone()
        if not self.empty:
            out[self.rows, self.cols] = values.to(out.dtype)
        return out


@contextlib.contextmanager
def selected_output_positions(model: torch.nn.Module, selection: PositionSelection, tp_group) -> Iterator[None]:
    """Within the block, ``model``'s output layer sees only ``selection``'s positions.

    ``model`` is a bare megatron-core ``GPTModel`` with ``post_process``; its logits come back
    as ``[1, n, v/tp]`` in ``selection`` order.
    """
    layer = model.output_layer
    sequence_parallel = layer.sequence_parallel
    index = selection.seq_first_index()

    def pre_hook(module, args, kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("selected_output_positions is forward-only (use it under no_grad)")
        hidden = args[0] if args else kwargs.pop("input_")
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
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
