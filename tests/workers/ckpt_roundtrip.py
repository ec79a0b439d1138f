"""Save a tiny model at one layout, load at another, compare last-stage logits."""

import sys

from common import dump, setup, tiny_model

import torch
from megatron.core import parallel_state

from megatron_ift.checkpoint.model_io import load_model, save_model
from megatron_ift.models.gpt import build_gpt_chunks


def main():
    mode, tp, pp, ckpt, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    par = setup(tp=tp, pp=pp, seed=7 if mode == "save" else 99)
    model = tiny_model()
    chunks = build_gpt_chunks(model, par)
    if mode == "save":
        save_model(chunks, ckpt)
    else:
        load_model(chunks, ckpt)
    # Forward through the pipeline by hand (p2p of hidden states) to get the logits.
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator  # noqa: F401
    torch.manual_seed(0)
    tokens = torch.randint(0, 60, (2, 16))
    pos = torch.arange(16)[None].expand(2, 16)
    (m,) = chunks
    group = parallel_state.get_pipeline_model_parallel_group()
    prank = parallel_state.get_pipeline_model_parallel_rank()
    ranks = torch.distributed.get_process_group_ranks(group)
    if prank > 0:
        hidden = torch.empty(16, 2, 32)
        torch.distributed.recv(hidden, src=ranks[prank - 1])
        m.set_input_tensor(hidden)
    with torch.no_grad():
        y = m(tokens, pos, None)
    if prank < pp - 1:
        torch.distributed.send(y.contiguous(), dst=ranks[prank + 1])
    elif parallel_state.get_tensor_model_parallel_rank() == 0:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    if prank == pp - 1:
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
        full = gather_from_tensor_model_parallel_region(y)
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(full, out)


if __name__ == "__main__":
    main()
