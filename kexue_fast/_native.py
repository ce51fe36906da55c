"""Bridge to the torch-free native module ``kexue_fast._C``: dtype codes, pointers, streams."""

from __future__ import annotations

import functools

import torch

from kexue_fast import _C

#: torch dtype -> kexue::DType code (csrc/include/kexue/common.h).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

BACKENDS: tuple[str, ...] = tuple(_C.backends())


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer of ``t`` (0 for None)."""
    return 0 if t is None else t.data_ptr()


def native(kernel: str, device: torch.device):
    """The ``_C`` launcher ``<kernel>_<cpu|cuda>`` for ``device``; a clear error if not built."""
    fn = getattr(_C, f"{kernel}_{device.type}", None)
    if fn is None:
        raise RuntimeError(
            f"kexue_fast was built without {device.type.upper()} kernels (built: {BACKENDS}); "
            "rebuild with nvcc on PATH or KEXUE_CUDA=ON"
        )
    return fn


@functools.cache
def launcher(kernel: str, device: torch.device):
    """``native(kernel, device)``, looked up once per (kernel, device). On CUDA it is wrapped to
    get the device's current stream (the raw getter) as its last argument and to run with that
    device current (a stream only takes launches from its own device)."""
    fn = native(kernel, device)
    if device.type != "cuda":
        return fn

    def on_current_stream(*args):
        index = torch._C._cuda_getDevice() if device.index is None else device.index
        stream = torch._C._cuda_getCurrentRawStream(index)
        if torch._C._cuda_getDevice() == index:
            fn(*args, stream)
        else:
            with torch.cuda.device(index):
                fn(*args, stream)

    return on_current_stream
