"""Device, precision, memory format and seeding: the small decisions the loop delegates."""

import contextlib
import functools
import os
import random
from pathlib import Path

import numpy as np
import torch

from gtrain.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA GPU is visible here; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r}: gtrain runs on cpu or cuda")
    return device


# "1" or "0" overrides what `cpu_has_native_bf16` reads from the CPU: with "1" a CPU without
# bf16 resolves precision "auto" as one with it does (to check that path; emulated bf16 is
# about 10x slower), with "0" a bf16 CPU resolves it as fp32.
CPU_BF16_ENV = "GTRAIN_CPU_BF16"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: there bf16 autocast made a ResNeXt-50 training step 1.6x faster
    than fp32 (docs/benchmarks.md); without them bf16 is emulated and slower."""
    setting = os.environ.get(CPU_BF16_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise UserError(f"{CPU_BF16_ENV}={setting!r}: set it to 1 (bf16 as on a bf16 CPU), 0 (fp32) or leave it unset")
    return _cpu_flags_have_bf16()


@functools.cache
def _cpu_flags_have_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device, setting: str = "precision") -> str:
    """"auto" becomes bf16 where the device computes it natively, else fp32. `setting` names
    where the value came from, for the error message (train.precision, --precision)."""
    if precision not in PRECISIONS:
        raise UserError(f"{setting} = {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{setting} = 'fp16' needs a CUDA GPU; on CPU use bf16 (or auto)")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_channels_last(setting: str, device: torch.device) -> bool:
    """auto: channels_last on CUDA, where cuDNN's NHWC kernels are faster for these models,
    and on CPU, where oneDNN's are as fast or faster: on an AVX2 CPU a ResNeXt-29 training
    step measured 1.3-1.5x faster in NHWC, HorNet and ResNeXt-50 steps the same within 3%
    (docs/benchmarks.md)."""
    if setting == "auto":
        return device.type in ("cuda", "cpu")
    return setting == "on"


def to_device(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool):
    inputs = inputs.to(device, non_blocking=True)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets.to(device, non_blocking=True)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # timm's RandAugment draws its ops from numpy's global generator
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def provenance(device: torch.device) -> dict[str, str]:
    """What a run was made with, for run.json and `gtrain report`: versions, the machine, and
    the git commit of the folder it was started from (where that is a git checkout; "+" when
    it has uncommitted changes)."""
    import platform
    import subprocess

    import torchvision

    from gtrain.version import __version__

    facts = {"gtrain": __version__, "python": platform.python_version(), "torch": torch.__version__,
             "torchvision": torchvision.__version__, "machine": f"{platform.node()} ({platform.system()} "
             f"{platform.machine()}, {os.cpu_count()} CPUs)"}  # fmt: skip
    if device.type == "cuda":
        facts["device"] = torch.cuda.get_device_name(device)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, timeout=5)  # fmt: skip
            facts["git_commit"] = head.stdout.strip() + ("+" if changed.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass  # no git here
    return facts
