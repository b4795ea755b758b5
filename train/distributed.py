"""Process group set-up: the same code path for one process and for many.

Under `torchrun` the environment says the rank and world size; started plainly, the
process makes a group of one (an in-memory store, no network). Either way training runs
through FSDP2 on a device mesh, so a single process computes exactly what N processes do.

The mesh is 1-D (FSDP: every parameter sharded over all ranks), or with
parallel.replicate N, 2-D (HSDP): N groups of world_size / N consecutive ranks (a node's
GPUs, as torchrun numbers them), each group holding a whole sharded copy and the groups
averaging their gradients. Gathers then stay inside a node; only one all-reduce of the
node's shards crosses the slower network between nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # None: a process on its own, outside any process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def alone(cls, device: torch.device) -> DistInfo:
        """One process with no process group (evaluation, generation): sums are its own."""
        return cls(0, 1, 0, device, None)


def setup(backend: str = "auto", replicate: int = 1) -> DistInfo:
    """Initialise the process group (nccl on GPUs, gloo on CPU) and the device mesh: 1-D,
    or with `replicate` > 1 (parallel.replicate) 2-D ("replicate", "shard") for HSDP."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
        else:  # a plain `python train/pretrain.py`: a group of one, no rendezvous needed
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    world_size = dist.get_world_size()
    return DistInfo(dist.get_rank(), world_size, local_rank, device, make_mesh(device, world_size, replicate))


def make_mesh(device: torch.device, world_size: int, replicate: int = 1) -> DeviceMesh:
    """FSDP's mesh over every rank, or HSDP's (replicate, world_size / replicate)."""
    if replicate == 1:
        return init_device_mesh(device.type, (world_size,))
    if world_size % replicate:
        raise ConfigError(f"parallel.replicate: {replicate} does not divide the world size {world_size} "
                          "(HSDP needs equal shard groups: set it to the number of nodes)")
    return init_device_mesh(device.type, (replicate, world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum of a number over all ranks (float64, so token counts stay exact); the number
    itself in a process outside any process group."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def barrier() -> None:
    dist.barrier()
