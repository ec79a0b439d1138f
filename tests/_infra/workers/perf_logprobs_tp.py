"""Fused chunked output layer + label log-probs (``linear_label_logprobs``) on this rank's
vocabulary shard: log-probs, the hidden-state gradient (summed over ranks, as the output layer's
TP reduction does) and this rank's weight-gradient shard, for several chunk sizes and dtypes."""

import sys

import torch
import torch.distributed as dist

from megatron_ift.ift.logprobs import linear_label_logprobs


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    n, h, v = 13, 8, 24
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    part = v // world
    results = {}
    for dtype in (torch.float64, torch.float32):
        for chunk in (1, 4, n, 100):
            x = hidden.to(dtype).detach().clone().requires_grad_(True)
            w = weight[rank * part:(rank + 1) * part].to(dtype).detach().clone().requires_grad_(True)
            lp = linear_label_logprobs(x, w, labels, dist.group.WORLD, chunk_size=chunk)
            (lp * upstream.to(lp.dtype)).sum().backward()
            dist.all_reduce(x.grad)  # the output layer's input-gradient all-reduce over TP
            shards = [torch.zeros_like(w.grad) for _ in range(world)]
            dist.all_gather(shards, w.grad)
            results[(str(dtype), chunk)] = (lp.detach(), x.grad, torch.cat(shards))
    if rank == 0:
        torch.save({"data": (hidden, weight, labels, upstream), "results": results}, out_path)


if __name__ == "__main__":
    main()
