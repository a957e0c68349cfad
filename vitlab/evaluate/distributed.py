"""Exact evaluation across processes: shard a dataset without padding, gather results and drop duplicates.

``torch.utils.data.DistributedSampler`` pads the last shard with repeated samples so that every rank gets the same
count; metrics computed on those outputs count some images twice. Here every output row travels with the index of
the sample it belongs to, the gather keeps one row per index and sorts by it, so the result is identical to a
single-process run (same rows, same order).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where tensors travel for a collective: the current CUDA device with NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_processes(values: list[float]) -> list[float]:
    """Sum numbers over all processes of the default process group (the numbers themselves without one). Float64,
    so counts stay exact."""
    if world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(num_samples)``: disjoint shards that together cover every
    sample exactly once (shard sizes differ by at most one; nothing is padded or repeated)."""

    def __init__(self, num_samples: int, rank: int | None = None, world_size: int | None = None):
        default_rank, default_world = world()
        self.num_samples = num_samples
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(input, label)`` so that each item becomes ``(input, label, index)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.dataset[index][:2]
        return x, y, index


def gather_by_index(indices: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather per-sample rows from every process, keep one row per sample index, sorted by index.

    ``indices`` (n,) int64 are the dataset indices of this process's rows; each tensor in ``tensors`` has n rows
    (any trailing shape, same on every process). Returns ``(indices, *tensors)`` on every process, each with one row
    per distinct index over all processes, in increasing index order. Rows sharing an index (padding duplicates)
    must be equal; the first one is kept. Without a process group the local rows are just deduplicated and sorted.
    Tensors are moved to the CPU; with the NCCL backend they travel through the current CUDA device."""
    indices = indices.reshape(-1).long().cpu()
    tensors = tuple(t.detach().cpu() for t in tensors)
    for t in tensors:
        if t.shape[0] != indices.shape[0]:
            raise ValueError(f"every tensor needs {indices.shape[0]} rows (one per index), got {t.shape[0]}")
    rank, world_size = world()
    if world_size > 1:
        device = _comm_device()
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
        dist.all_gather(sizes, torch.tensor([indices.shape[0]], device=device))
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)

        def gather(t: torch.Tensor) -> torch.Tensor:
            padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
            padded[: t.shape[0]] = t.to(device)
            parts = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(parts, padded)
            return torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()

        indices = gather(indices)
        tensors = tuple(gather(t) for t in tensors)
    order = torch.argsort(indices, stable=True)
    indices = indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return (indices[keep], *(t[order][keep] for t in tensors))
