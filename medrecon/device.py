"""The torch device of a job, from a config setting (``reconstruct.device``, ``train.device``, ``--device``)."""

from __future__ import annotations

import torch

from medrecon.errors import DeviceError


def pick_device(setting: str, key: str = "device") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` on a machine without one is a DeviceError naming the
    config ``key`` it came from."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key} is 'cuda' but torch sees no CUDA GPU on this machine.",
                          fix=f"set {key}: auto (or cpu), or run on a GPU node.")
    return torch.device(setting)
