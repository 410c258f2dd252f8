"""Loading a pipeline for a command: the device and precision it asks for, CPU offloading, compiling, VAE tiling;
and the facts a run reports about its device. torch, diffusers and transformers are imported inside the functions:
the command line imports this module before it has checked its flags, and loads them only to run."""

from __future__ import annotations

import os
import platform

from .defaults import DEFAULTS
from .errors import DiT4EditError
from .model_folder import default_model

#: --offload choices -> the diffusers pipeline method that installs the offload hooks.
OFFLOAD = {"model": "enable_model_cpu_offload", "sequential": "enable_sequential_cpu_offload"}


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.getdevice_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def cpu_only(name: str) -> bool:
    """Whether the processes of a distributed run work on the CPU (gloo) rather than one accelerator each."""
    import torch

    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


def load_pipeline(args, device=None, model=None):
    """The pipeline of `model` (the command's model, its `.name` a folder or hub id; default: --model, else the
    embedded model) on `device` (default: the one --device names), with the command's precision, offloading,
    compiling and tiling flags. (`from_pretrained` checks the folder.)"""
    import torch

    from .pipeline import DiT4EditPipeline

    name = model.name if model is not None else (args.model or default_model())
    if args.quiet:
        silence_loading_bars()
    device = device or device_for(args.device)
    dtype = dtype_for(args.dtype, torch.device(device).type)
    check_offload(args.offload, torch.device(device).type)
    pipe = DiT4EditPipeline.from_pretrained(name, torch_dtype=dtype)
    if args.offload:
        getattr(pipe, OFFLOAD[args.offload])(device=device)
    else:
        pipe.to(device)
    if args.compile:
        pipe.compile_blocks()
    if args.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=args.quiet)
    torch.manual_seed(DEFAULTS.seed if args.seed is None else args.seed)
    return pipe


def silence_loading_bars() -> None:
    """--quiet: the loaders' own progress bars too (the process is ours; the CLI may set library-wide options)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def device_for(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DiT4EditError("--device cuda asked for, but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DiT4EditError("--device mps asked for, but MPS is not available")
    return name


def check_offload(offload: str | None, device: str) -> None:
    if offload and device == "cpu":
        raise DiT4EditError(f"--offload {offload} needs a GPU (--device cuda or mps); on the CPU the models already "
                            "sit in CPU memory")


def dtype_for(name: str, device: str):
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    return getattr(torch, name)
