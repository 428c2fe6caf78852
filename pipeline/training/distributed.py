"""Multi-process training under ``torchrun``: the process group, DDP wrapping, rank-0-only side effects.

torchrun starts one process per device and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`setup` reads it, joins the process
group (NCCL on CUDA, Gloo on the CPU) once per process and returns a :class:`DistContext`; without torchrun it
returns a single-process context and nothing is initialised. Only rank 0 writes files, validates and logs
progress; the others wait at collectives.
"""

from __future__ import annotations

import atexit
import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError
from pipeline.training.launch import torchrun_env

log = logging.getLogger(__name__)

TIMEOUT_MINUTES = 60  # rank 0 validates while the others wait; generous so slow validation is not a failure
_RANK_SEED_STRIDE = 1_000_033


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` and the torch ``device`` it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True on rank 0 (or outside torchrun); the stage writes its record and model files only there."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = torchrun_env()
    return env is None or env[0] == 0


def setup(device: str) -> DistContext:
    """Join torchrun's process group (once per process) and pick this rank's device.

    ``device`` is ``"cpu"`` or ``"cuda"``; under torchrun on CUDA each rank trains on ``cuda:LOCAL_RANK``.
    """
    env = torchrun_env()
    if env is None:
        return DistContext(device=device)
    rank, world, local = env
    dev_type = torch.device(device).type
    if dev_type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                              "device(s); start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        backend = "nccl" if dev_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
        atexit.register(_destroy)
        log.info("distributed: rank %d of %d joined (%s, device %s)", rank, world, backend, device)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for sampling and augmentation (rank 0 keeps ``seed``, so one process matches rank 0)."""
    return (int(seed) + _RANK_SEED_STRIDE * int(rank)) % (2**31 - 1)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``model`` (its weights broadcast from rank 0); ``model`` itself otherwise."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if torch.device(ctx.device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers (its state_dict has no prefixes)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _collective_device(ctx: DistContext) -> torch.device:
    return torch.device(ctx.device) if torch.device(ctx.device).type == "cuda" else torch.device("cpu")


def broadcast_object(obj: Any, ctx: DistContext, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small things and checkpoints)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_collective_device(ctx))
    return box[0]


def from_main_process(value: Any, *, device: str) -> Any:
    """Rank 0's ``value`` on every rank, joining torchrun's process group if needed (``value`` itself outside
    torchrun). For decisions every rank must share, e.g. whether a stage is already up to date."""
    return broadcast_object(value, setup(device))


def broadcast_floats(values: list[float], ctx: DistContext, *, src: int = 0) -> list[float]:
    """Rank ``src``'s numbers on every rank (float64)."""
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(ctx))
    dist.broadcast(tensor, src=src)
    return [float(v) for v in tensor.tolist()]


def sum_floats(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
