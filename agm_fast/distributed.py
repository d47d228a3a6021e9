"""The process group of a torchrun launch (docs/design.md §1 "Several processes"), and nothing
else: setup and teardown, rank and world, the per-rank batch, DistributedDataParallel wrapping,
the all-gather the step needs, agreement on stopping, barriers.

    torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] \
        -m agm_fast.cli train ...

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; `setup` then joins the process group (NCCL on
CUDA with device cuda:LOCAL_RANK, gloo on the CPU) and returns a `Dist`. Without torchrun it
returns None and nothing in agm_fast runs a collective: the single-process path is unchanged.
`teardown` destroys the group; the CLI calls it in a `finally`, so a worker leaves the group on
every exit path (no abort at interpreter exit, and the other ranks see a closed peer instead of
waiting forever).

Host-side flags (the stop signal) go through a gloo group even when the step's collectives are
NCCL, so agreeing on stopping never synchronises the GPU. AGM_FAST_DIST_TIMEOUT (seconds) sets
the process group's timeout (torch's default otherwise); the CPU tests use it so that a lost
peer ends in an error, never a hang.
"""

from __future__ import annotations

import datetime
import os
import signal
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError

TIMEOUT_ENV = "AGM_FAST_DIST_TIMEOUT"


def launched() -> bool:
    """True when this process was started by torchrun (or any launcher that sets its env)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. Every method is a collective: all ranks call it, in the
    same order."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    cpu_group: object = None  # gloo group for host-side flags (None: the default group is gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x, in rank order (identical on every rank)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's host integer, on every rank (the agreement on stopping).
        Through the gloo group, so it never waits for the GPU."""
        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(flag.item())

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable, small) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]


def setup(device: torch.device) -> Dist | None:
    """Join the process group when launched by torchrun; None otherwise. `device` is the
    resolved train.device: on CUDA this rank takes cuda:LOCAL_RANK and NCCL, on the CPU gloo."""
    if not launched():
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                              "device(s): give torchrun --nproc_per_node ≤ the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"train.device={device}: distributed training runs on cuda or cpu")
    kw = {}
    if os.environ.get(TIMEOUT_ENV):
        kw["timeout"] = datetime.timedelta(seconds=float(os.environ[TIMEOUT_ENV]))
    if backend == "nccl":
        kw["device_id"] = device  # binds the communicator to this GPU at once
    dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    cpu_group = None
    if backend != "gloo":
        cpu_group = dist.new_group(backend="gloo", **({"timeout": kw["timeout"]} if "timeout" in kw else {}))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, backend=backend, cpu_group=cpu_group)


def teardown() -> None:
    """Destroy the process group if there is one (safe to call on any exit path, twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_world(d: Dist | None) -> tuple[int, int]:
    return (0, 1) if d is None else (d.rank, d.world)


def per_rank_batch(batch_size: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(images per rank per step, images per forward pass). train.batch_size is the global batch at
    every world size; micro_batch (0 = the whole per-rank batch) must divide the per-rank batch."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must be divisible by the "
                          f"world size {world} (torchrun's nproc_per_node × nnodes)")
    per_rank = batch_size // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch={micro_batch} must divide the per-rank batch train.batch_size / "
                          f"world = {batch_size} / {world} = {per_rank}")
    return per_rank, micro


def wrap(module: torch.nn.Module, d: Dist | None) -> torch.nn.Module:
    """DistributedDataParallel(module) under a process group (gradients averaged over ranks in
    backward; rank 0's parameters broadcast now), the module itself otherwise."""
    if d is None:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=d.device if ids else None)


def no_sync(module: torch.nn.Module, last: bool):
    """DDP's no_sync() for every micro-batch but the last: gradients add up locally and are
    all-reduced once, in the last micro-batch's backward."""
    if last or not hasattr(module, "no_sync"):
        return nullcontext()
    return module.no_sync()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
