"""Process groups, data-parallel wrapping and state dicts for runs under ``torchrun``.

``torchrun --nproc_per_node=N -m vitlab train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; then
:func:`setup` starts the process group (NCCL on GPUs, gloo on CPU) and gives each process its device. Models are
wrapped in DDP, or sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per encoder block plus the
root) for models too large to replicate. Multi-node runs use torchrun's usual ``--nnodes``, ``--node_rank`` and
``--rdzv_endpoint`` flags; nothing here depends on the number of nodes.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..devices import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def available_cpus() -> int:
    """CPU cores this process may use: the affinity mask, capped by a cgroup (container) CPU quota when one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max", encoding="ascii").read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def setup(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1); a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        store = None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart not in ("", "0"):
            # after torchrun restarts the processes, the rendezvous store still holds the addresses the processes
            # of the last attempt published; a fresh key prefix keeps the new ones from connecting to dead ports
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            store = dist.PrefixStore(f"vitlab/restart_{restart}", store)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None,
                                store=store, rank=rank if store is not None else -1,
                                world_size=world if store is not None else -1)
    return DistInfo(rank, world, local_rank, dev)


def teardown(wait_for_peers: bool = True) -> None:
    """Leave the process group; every rank first waits for the others so that none exits while a peer still has
    gloo traffic in flight (a rank aborting at exit was seen once with FSDP on the CPU). ``wait_for_peers=False``
    when a peer is gone (a barrier would fail again, or hang)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


# what a collective raises when a peer process has gone (gloo over TCP; NCCL's communicator errors)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport",
              "NCCL communicator", "ncclRemoteError")


def lost_ranks(exc: BaseException, wait: float = 3.0) -> list[int] | None:
    """The ranks that have gone when ``exc`` is a collective's failure caused by a peer's end; None when it is not
    (or that cannot be told). Every surviving rank says it is alive in the rendezvous store (torchrun's agent holds
    it, so it outlives the processes) and waits up to ``wait`` seconds for the others; those that never answer are
    the lost ones."""
    if not (isinstance(exc, RuntimeError) and dist.is_available() and dist.is_initialized()):
        return None
    if not any(text in str(exc) for text in _PEER_GONE):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        keys = [f"vitlab/alive/{attempt}/{r}" for r in range(dist.get_world_size())]
        store.set(keys[dist.get_rank()], "1")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not missing or time.monotonic() > deadline:
                return missing or None
            time.sleep(0.1)
    except Exception:  # the store went with the lost process (a launch without torchrun's agent): cannot tell
        return None


def wrap(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 for a multi-process run; the model itself for one process, except FSDP2 in a process
    group of one that the caller started (one GPU: the same sharded code path, over one rank).

    With FSDP2 every encoder block is its own shard unit and the rest (embeddings, final norm, head) belongs to the
    root unit; parameters become DTensors sharded over the ranks."""
    if not info.distributed and not (fsdp and dist.is_available() and dist.is_initialized()):
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Unsharded model and optimiser state dicts on the CPU, the same for DDP, FSDP and single-process models
    (``torch.distributed.checkpoint.state_dict``); every rank must call this, rank 0 writes the result."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                          optim_sd: dict | None) -> None:
    """Inverse of :func:`full_state_dicts` (strict: missing or unexpected keys are an error)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def node_name() -> str:
    """This process's machine as a one-line error names it: torchrun's node rank (``GROUP_RANK``) and the host."""
    node = os.environ.get("GROUP_RANK")
    return f"node {node} ({socket.gethostname()})" if node is not None else socket.gethostname()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank ``src`` to every rank (identity for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
