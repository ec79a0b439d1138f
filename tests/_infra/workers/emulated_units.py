"""Checks of the emulated CUDA device itself, in one process (the emulation is process-wide).

Prints one JSON object: check name -> what happened ("ok", "raised: <message>", or a value).
"""

import json
import os

from megatron_ift import emulated_cuda
from megatron_ift.platform import bootstrap

PLATFORM = bootstrap(emulate="1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def attempt(fn):
    try:
        out = fn()
        return "ok" if out is None else out
    except emulated_cuda.EmulatedDeviceError as exc:
        return f"raised: {exc}"


def main() -> None:
    r = {}
    dev = torch.randn(4, device="cuda")
    host = torch.randn(4)
    r["cuda_available"] = torch.cuda.is_available()
    r["device_reported"] = str(dev.device)
    r["host_device_reported"] = str(host.device)
    r["mixing"] = attempt(lambda: dev + host)
    r["host_scalar"] = attempt(lambda: str((dev * torch.tensor(2.0)).device))
    r["to_device"] = attempt(lambda: str((dev + host.to(dev.device)).device))
    r["cuda_copy_is_new"] = attempt(lambda: emulated_cuda.on_device(host.cuda()) and not emulated_cuda.on_device(host))
    r["factory_like"] = attempt(lambda: str(torch.arange(3, device=dev.device).device))
    x = torch.randn(3, device="cuda", requires_grad=True)
    (x * host[:3]).sum().backward() if False else (x * 2).sum().backward()
    r["grad_on_device"] = emulated_cuda.on_device(x.grad)
    lin = torch.nn.Linear(4, 2)
    r["module_host_mixing"] = attempt(lambda: lin(dev[None]))
    lin.cuda()
    r["module_cuda"] = attempt(lambda: str(lin(dev[None]).device))
    p = torch.nn.Parameter(torch.empty(2, device="cuda"))
    r["parameter_keeps_device"] = emulated_cuda.on_device(p)
    before = emulated_cuda.host_syncs()
    float(dev.sum()), dev.tolist(), dev.cpu(), dev.nonzero()
    r["syncs_counted"] = emulated_cuda.host_syncs() - before
    r["cpu_is_host"] = not emulated_cuda.on_device(dev.cpu())
    with emulated_cuda.no_host_sync("a test loop"):
        r["sync_in_region"] = attempt(lambda: dev.sum().item())
        r["device_op_in_region"] = attempt(lambda: str((dev * 2).sum().device))

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29555"))
    dist.init_process_group("nccl", rank=0, world_size=1)
    gloo = dist.new_group([0], backend="gloo")
    r["collective_host_default_group"] = attempt(lambda: dist.all_reduce(host.clone()))
    r["collective_device_default_group"] = attempt(lambda: dist.all_reduce(dev.clone()))
    r["collective_host_gloo_group"] = attempt(lambda: dist.all_reduce(host.clone(), group=gloo))
    r["p2p_host_buffer"] = attempt(lambda: dist.broadcast(host.clone(), src=0))
    out = [None]
    r["object_collective"] = attempt(lambda: dist.all_gather_object(out, {"a": 1}))
    dist.destroy_process_group()
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
