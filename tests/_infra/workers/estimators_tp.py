"""Vocab-parallel estimators and log-probs on this rank's shard of a full logits tensor."""

import sys

import torch
import torch.distributed as dist

from megatron_ift.ift import IFTConfig, estimate, label_logprobs_no_grad
from vocab_parallel import label_logprobs


def main():
    full_path, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.load(full_path)
    logits, labels, vocab = data["logits"], data["labels"], data["vocab_size"]
    part = logits.shape[-1] // world
    local = logits[..., rank * part : (rank + 1) * part].clone()
    group = dist.group.WORLD
    results = {}
    for name, cfg in data["configs"].items():
        results[name] = estimate(local, IFTConfig(**cfg), vocab, step=5,
                                 sample_ids=torch.arange(logits.shape[0]) + 100, group=group)
    x = local.double().requires_grad_(True)
    lp = label_logprobs(x, labels, group)
    (lp * data["grad_weights"]).sum().backward()
    grads = [torch.zeros_like(x.grad) for _ in range(world)]
    dist.all_gather(grads, x.grad)
    results["logprobs"] = lp.detach()
    results["logprobs_no_grad"] = label_logprobs_no_grad(local.double(), labels, group)
    results["logprob_grad"] = torch.cat(grads, dim=-1)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
