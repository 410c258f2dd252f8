"""Helpers the benchmark scripts share: wait for the device, and describe it in a results header."""

from __future__ import annotations

import contextlib
import platform

import torch


def synchronize(device) -> None:
    """Wait for queued GPU work, so a timer reads the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def describe_device(device) -> str:
    """The GPU or CPU model and the torch build, for the header of a benchmark's results."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
