"""Bridge to the torch-free native module ``kexue_fast._C``: dtype codes, pointers, streams."""

from __future__ import annotations

import torch

from kexue_fast import _C

#: torch dtype -> kexue::DType code (csrc/include/kexue/common.h).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

BACKENDS: tuple[str, ...] = tuple(_C.backends())


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer of ``t`` (0 for None)."""
    return 0 if t is None else t.data_ptr()


def cuda_stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as an integer handle."""
    return torch.cuda.current_stream(t.device).cuda_stream


def native(kernel: str, device: torch.device):
    """The ``_C`` launcher ``<kernel>_<cpu|cuda>`` for ``device``; a clear error if not built."""
    fn = getattr(_C, f"{kernel}_{device.type}", None)
    if fn is None:
        raise RuntimeError(
            f"kexue_fast was built without {device.type.upper()} kernels (built: {BACKENDS}); "
            "rebuild with nvcc on PATH or KEXUE_CUDA=ON"
        )
    return fn


def launch(kernel: str, like: torch.Tensor, *args) -> None:
    """Runs the ``_C`` launcher of ``kernel`` for ``like``'s device; a CUDA launcher also gets
    the device's current stream and runs with that device current."""
    fn = native(kernel, like.device)
    if like.is_cuda:
        with torch.cuda.device(like.device):
            fn(*args, cuda_stream(like))
    else:
        fn(*args)
