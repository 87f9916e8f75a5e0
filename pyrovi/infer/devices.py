"""Choice of the torch device."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a device into a torch device.

    ``"auto"`` picks the first CUDA device when one is available, else the CPU.

    Raises
    ------
    ValueError
        If a CUDA device is requested but CUDA is not available, or the index is out of range.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} was requested but CUDA is not available in this torch "
                f"build ({torch.__version__}); use device='cpu' or install a CUDA build of torch."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible."
            )
    return resolved
