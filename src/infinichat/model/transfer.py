"""Small host tensors (token ids, positions, slot indices, rotation tables) onto the compute device."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`. To a GPU through page-locked memory with a non_blocking copy: PyTorch's plain copy from
    pageable host memory synchronizes the stream (memcpy_and_sync), so the host would stop queuing the rest of a
    step until the GPU drained; this one returns at once (PyTorch's pinned-memory cache keeps the staging block
    until the copy is done). On the CPU, `t` itself."""
    device = torch.device(device)
    if device.type == "cpu" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
