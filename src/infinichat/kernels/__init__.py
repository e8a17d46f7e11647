"""Kernel sets: *how* and *where* the forward's ops run, chosen once at load.

- `torch`: plain PyTorch ops, any device (CPU or CUDA); what a CUDA device runs, and what CI runs on the CPU.
  Its members chosen at load: PyTorch's int8/int4 weight-only kernels for quantized weights (model/quant.py:
  the CPU or the CUDA variant by the weights' device) and, with --compile, the static-shape one-token step
  under torch.compile / CUDA graphs (static_step.py).
- `cpu-native`: the torch ops plus the CPU's faster members (oneDNN-packed bf16 weights, the CPU flash
  kernel, the native C library's row ops, prompt attention and one-token decode step).

A kernel set declares the architecture features (model/arch.py) it supports and the device types it runs on;
`make_kernels` refuses a model it does not cover. `auto` picks `cpu-native` on the CPU, `torch` elsewhere.
"""

from __future__ import annotations

import torch

from infinichat.errors import DeviceError, InfinichatError
from infinichat.kernels.cpu_native import CpuNativeKernels
from infinichat.kernels.torch_ops import RopeTables, TorchKernels

__all__ = ["DEVICE_CHOICES", "KERNEL_SETS", "RopeTables", "TorchKernels", "make_kernels", "resolve_device"]

KERNEL_SETS: dict[str, type[TorchKernels]] = {"torch": TorchKernels, "cpu-native": CpuNativeKernels}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` (CUDA when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N` -> a torch.device with its index
    (cuda:0 for `cuda` and `auto`: a device compares equal to its tensors' devices, and reports say which GPU); a
    clear DeviceError when the device does not exist here."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else name.strip().lower()
    if not name:  # `--device ""` (a script's empty variable) is no device; it used to mean auto, silently
        raise DeviceError(f"--device is empty; accepted: {DEVICE_CHOICES}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdecimal()):
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
            raise DeviceError(
                f"--device {name}: no CUDA device is available (torch {torch.__version__}, {build}); "
                "use --device cpu or auto"
            )
        index = int(name[5:]) if ":" in name else 0  # (isdecimal: "cuda:²" is isdigit() but no int())
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..cuda:"
                f"{torch.cuda.device_count() - 1})"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown --device {name!r}; accepted: {DEVICE_CHOICES}")


def make_kernels(name: str, device: torch.device, model_features: frozenset[str]) -> TorchKernels:
    """The kernel set `name` (auto, torch, cpu-native) for a model on `device` using `model_features`."""
    if name == "auto":
        name = "cpu-native" if device.type == "cpu" else "torch"
    cls = KERNEL_SETS.get(name)
    if cls is None:
        raise InfinichatError(f"unknown kernel set {name!r}; accepted: auto, {', '.join(KERNEL_SETS)}")
    if device.type not in cls.device_types:
        raise DeviceError(f"the {name} kernels run on {', '.join(cls.device_types)}, not on {device}")
    missing = model_features - cls.supports
    if missing:
        raise InfinichatError(f"the {name} kernels do not implement {', '.join(sorted(missing))}")
    return cls()
