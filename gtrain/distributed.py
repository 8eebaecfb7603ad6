"""torch.distributed under torchrun or srun: DDP with NCCL on CUDA, gloo on CPU.

gtrain starts no processes of its own. `torchrun --nproc-per-node N -m gtrain fit ...`
(or `gtrain fit --nproc N`, which runs the same launcher) sets RANK, WORLD_SIZE and
LOCAL_RANK; `srun gtrain fit ...` with one task per process sets SLURM_PROCID,
SLURM_STEP_NUM_TASKS and SLURM_LOCALID, and the rendezvous is MASTER_ADDR:MASTER_PORT or
the first host of the job. `init` joins the process group they describe. Without them
everything here is a no-op, and `gtrain eval` never calls it.

When a peer dies, the survivors' next collective fails (gloo: "Connection closed by
peer"; NCCL: an error or the timeout); `peers_watched` turns that into `LostPeer`, which
the command line prints as one line.
"""

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gtrain.errors import UserError, error_line

# A collective that waits longer than this means a peer is gone: fail instead of hanging.
TIMEOUT = datetime.timedelta(minutes=5)
# Where srun's processes meet when MASTER_PORT is unset: a port of the job's own, so that
# two jobs sharing a node do not collide.
SLURM_BASE_PORT = 20000


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        """What the launcher says this process will be, before the process group exists:
        torchrun's variables, else those srun sets for each task of a job step."""
        env = os.environ
        if "WORLD_SIZE" in env:
            return cls(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script sees the job's task count
        # but is one process; srun sets the step's count in each task it starts.
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
        if tasks > 1:
            return cls(int(env.get("SLURM_PROCID", "0")), tasks, int(env.get("SLURM_LOCALID", "0")))
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def torchrun_command(executable: str, argv: list[str], nproc: int) -> list[str]:
    """`gtrain fit ... --nproc N` as `torchrun --standalone --nproc-per-node N -m gtrain fit ...`
    (`argv` without the program, as sys.argv[1:])."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    return [executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "gtrain", *args]


def launched_distributed() -> bool:
    return World.from_env().distributed


def restart_count() -> int:
    """How often the launcher has restarted this job: torchrun's restarts of its workers, or
    SLURM's requeues. 0 on a first start."""
    env = os.environ
    return int(env.get("TORCHELASTIC_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or 0)


def init(device: torch.device) -> World:
    """Join the process group the launcher described; pick this process's GPU."""
    world = World.from_env()
    if not world.distributed:
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's own store outlives a restart of its workers and keeps the dead ones'
        # addresses: each attempt meets under keys of its own.
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size, is_master=False, timeout=TIMEOUT)
        store = dist.PrefixStore(f"gtrain/attempt_{restart_count()}", store)
        dist.init_process_group(backend=backend, store=store, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    elif "WORLD_SIZE" in env:  # torchrun without its store: MASTER_ADDR / MASTER_PORT
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    else:
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{slurm_rendezvous()}", rank=world.rank, world_size=world.size,
            timeout=TIMEOUT,
        )  # fmt: skip
    return World(dist.get_rank(), dist.get_world_size(), world.local_rank)


def slurm_rendezvous(env=os.environ) -> str:
    """host:port where srun's tasks meet: MASTER_ADDR / MASTER_PORT where set, else the job's
    first host and a port derived from its job id."""
    host = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    if not host:
        raise UserError("srun started gtrain without SLURM_JOB_NODELIST: set MASTER_ADDR to the first host of the job")
    port = env.get("MASTER_PORT") or str(SLURM_BASE_PORT + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return f"{host}:{port}"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[07-09,12],cpu1" -> "gpu07",
    "rack[1-2]-n[3,5]" -> "rack1-n3"."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist.strip()).group(0)
    return re.sub(r"\[([^\]]*)\]", lambda ranges: re.split(r"[-,]", ranges.group(1))[0], first)


class LostPeer(Exception):
    """A process of the run died; this one cannot go on without it."""

    def __init__(self, world: World, cause: BaseException):
        # With two processes the lost one is the other; with more, the launcher's report names it.
        lost = f"rank {1 - world.rank} of 2" if world.size == 2 else f"a process of {world.size}"
        # gloo's "[.../pair.cc:561] Connection closed by peer [10.0.0.2]:5000. This is typically ...": the middle part.
        what = re.sub(r"^\[[^\]]*\]\s*", "", error_line(cause, limit=300)).split(". ")[0]
        self.message = f"{lost} was lost ({what}); rank {world.rank} stopped"
        super().__init__(self.message)


# What a collective raises when a peer has died: gloo's socket errors, NCCL's errors and timeouts.
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|timed out|timeout|NCCL (error|communicator)", re.I)


@contextlib.contextmanager
def peers_watched(world: World):
    """Raise `LostPeer` for the failure of a collective whose peer died."""
    try:
        yield
    except LostPeer:
        raise
    except (RuntimeError, dist.DistError) as error:
        if world.distributed and (isinstance(error, dist.DistNetworkError) or PEER_GONE.search(str(error))):
            raise LostPeer(world, error) from error
        raise


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


def share_main_buffers(module: nn.Module, world: World) -> None:
    """Give every process the main process's buffers (BatchNorm's running statistics): each
    process updates them with its own share of the batch, and the main process's are the
    ones checkpoints and weights files keep. Validation then scores every image with the
    weights `gtrain eval` loads; DDP does the same at the start of every training step."""
    if not world.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_object(value, world: World):
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_object(value, world: World) -> list | None:
    """Every process's `value`, in rank order, on the main process; None on the others."""
    if not world.distributed:
        return [value]
    gathered = [None] * world.size if world.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def decided_by_main(decide, world: World):
    """`decide()` run by the main process alone (it reads the run folder, takes its lock);
    every process gets its result, or raises its UserError."""
    outcome = None
    if world.is_main:
        try:
            outcome = ("result", decide())
        except UserError as error:
            outcome = ("error", str(error))
    kind, value = broadcast_object(outcome, world)
    if kind == "error":
        raise UserError(value)
    return value


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
