"""Devices: which one a peer trains on, how it is made deterministic, and what it is.

A peer's model, its inner AdamW state and the inner loop live on the *training device*
(`--device auto|cpu|cuda|cuda:N|mps`, or `device` in settings.toml). Everything the
group must agree on bit for bit stays on the CPU: θ_r, the pseudo-gradient Δ, the codec,
the all-reduce, the outer step and the checkpoint files. So a group whose members train
on different devices still commits one model: each member's Δ differs (as it would on
different data), but the aggregate and the outer step are computed on CPU tensors.

`resolve_device` is the one function that turns a device string into a `torch.device`
(`swarmfold doctor` calls it to show what `auto` picks). `configure_determinism` applies
the device's determinism contract, and `device_environment` describes the device for the
environment class recorded in checkpoints, receipts and records (peer/local.py
`environment`): the same class gives the same bits, another class is judged by tolerance.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from swarmfold.errors import UserError

logger = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"  # what torch.use_deterministic_algorithms needs for cuBLAS (CUDA >= 10.2)


class DeviceError(UserError):
    """A device was asked for that this machine (or this torch build) does not have."""


def torch_build() -> str:
    """What this torch was built for, in words: 'the CPU build 2.13.0+cpu' or 'a CUDA 12.4 build 2.5.1'."""
    if torch.version.cuda:
        return f"a CUDA {torch.version.cuda} build {torch.__version__}"
    if getattr(torch.version, "hip", None):
        return f"a ROCm {torch.version.hip} build {torch.__version__}"
    return f"the CPU build {torch.__version__}"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Every training device this process can use, e.g. ['cuda:0', 'cuda:1', 'cpu']."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a `--device` string into a `torch.device` that exists on this machine.

    `auto` picks CUDA (device 0), then Apple's MPS, then the CPU. `cuda` means `cuda:0`.
    A device that is asked for and missing raises DeviceError naming what was found,
    e.g. "cuda requested but torch.cuda.is_available() is False: this torch is the CPU
    build 2.13.0+cpu; found devices: cpu".
    """
    text = (name or "auto").strip().lower()
    found = ", ".join(available_devices())
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            built = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_built()
            raise DeviceError(f"mps requested but torch.backends.mps.is_available() is False: this torch "
                              f"{'has' if built else 'was built without'} MPS support ({torch_build()}) and "
                              f"this machine offers no Apple GPU to it; found devices: {found}; "
                              "use --device cpu or --device auto")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[len("cuda:"):] if ":" in text else "0"
        if not index_text.isdigit():
            raise DeviceError(f"--device {name!r}: expected cuda or cuda:N with N a GPU index, e.g. cuda:0")
        index = int(index_text)
        if not torch.cuda.is_available():
            raise DeviceError(f"{text} requested but torch.cuda.is_available() is False: this torch is "
                              f"{torch_build()}; found devices: {found}; install a CUDA build of torch "
                              "(see docs/foundation.md) or use --device cpu")
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"{text} requested but this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1}); found devices: {found}")
        return torch.device("cuda", index)
    raise DeviceError(f"--device {name!r} is unknown; use auto, cpu, cuda, cuda:N or mps")


def configure_determinism(device: torch.device, *, allow_tf32: bool = False) -> None:
    """Apply the device's determinism contract (process-wide; call before the first CUDA kernel).

    On CUDA: deterministic algorithms (an op without a deterministic kernel raises instead of
    silently varying), the cuBLAS workspace setting they need, cuDNN deterministic with
    autotuning off, and TF32 off unless the spec allows it (`inner.allow_tf32`). The CPU needs
    nothing beyond the fixed thread count (peer/trainer.py `set_threads`). On MPS torch offers
    no such switches; the promise there is only what was measured (docs/foundation.md).
    """
    if device.type != "cuda":
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (CUBLAS_WORKSPACE, ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def _nvidia_driver() -> str:
    """The NVIDIA driver version through NVML (the nvidia-ml-py package), else 'unknown'."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as e:  # not installed, no NVML library, no driver: the class says so
        logger.debug("NVIDIA driver version unavailable: %s", e)
        return "unknown"


def device_environment(device: torch.device) -> dict[str, Any]:
    """The device part of the environment class: kind, and for GPUs name, compute capability,
    CUDA, cuDNN and driver versions. Every key is always present (a string; '' where it does
    not apply), so that a CPU peer's class compares cleanly with a GPU peer's."""
    return dict(_device_environment(str(device)))


@functools.cache
def _device_environment(name: str) -> dict[str, Any]:  # asked at every checkpoint: NVML once per process
    device = torch.device(name)
    env: dict[str, Any] = {"device": device.type, "device_name": "", "compute_capability": "", "cuda": "",
                           "cudnn": "", "driver": ""}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env.update(device_name=torch.cuda.get_device_name(index), compute_capability=f"{major}.{minor}",
                   cuda=str(torch.version.cuda or ""), cudnn=str(cudnn or "none"), driver=_nvidia_driver())
    elif device.type == "mps":
        import platform

        env.update(device_name="apple-mps", driver=platform.mac_ver()[0] or "unknown")
    return env


def describe(device: torch.device) -> str:
    """One line for logs, `status` and the dashboard: 'cuda:0 (NVIDIA H200, sm 9.0)' or 'cpu'."""
    if device.type == "cuda":
        env = device_environment(device)
        return f"{device} ({env['device_name']}, sm {env['compute_capability']})"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to the device: pinned and asynchronous on CUDA, a no-op when already there."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
