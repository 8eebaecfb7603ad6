"""torch.distributed under torchrun: DDP with NCCL on CUDA, gloo on CPU.

gtrain starts no processes of its own: `torchrun --nproc-per-node N -m gtrain fit ...`
(or `gtrain fit --nproc N`, which runs the same launcher) sets RANK, WORLD_SIZE and
LOCAL_RANK, and `init` joins the process group they describe. Without them everything
here is a no-op, and `gtrain eval` never calls it.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gtrain.errors import UserError

# A collective that waits longer than this means a peer is gone: fail instead of hanging.
TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        """What torchrun says this process will be, before the process group exists."""
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> World:
    """Join the process group torchrun described; pick this process's GPU."""
    if not launched_by_torchrun():
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def local_device(device: torch.device, world: World) -> torch.device:
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def per_process_batch(global_batch: int, world: World) -> int:
    if global_batch % world.size:
        raise UserError(
            f"data.batch_size = {global_batch} is the global batch and must divide evenly over "
            f"{world.size} processes: use a multiple of {world.size}"
        )
    return global_batch // world.size


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree(flags: list[bool], device: torch.device, world: World) -> list[bool]:
    """Each flag true on every process when it is true on any: all processes must take the
    same branch (stop, checkpoint) at the same step, or their collectives deadlock."""
    if not world.distributed:
        return flags
    tensor = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def wrap(model: nn.Module, sync_bn: bool, device: torch.device, world: World) -> nn.Module:
    """The module the training step calls: DDP under torchrun, the model itself otherwise."""
    if not world.distributed:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("train.sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); set it to false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(module: nn.Module, enabled: bool):
    """DDP all-reduces gradients in every backward; while accumulating micro-batches only
    the last backward of a step needs to, so the others run under `no_sync`."""
    module = getattr(module, "_orig_mod", module)  # torch.compile wraps the DDP module
    if enabled or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def broadcast_object(value, world: World):
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@contextlib.contextmanager
def main_process_first(world: World):
    """The main process runs the block first (a download, say), then the others do."""
    if world.distributed and not world.is_main:
        dist.barrier()
    yield
    if world.distributed and world.is_main:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
