"""The native module itself: what it reports, how its launchers validate arguments, and that a
CUDA launcher fails cleanly (an exception, not a crash) on a machine without a GPU."""

import pytest
import torch

from kexue_fast import _C, _native


def test_reports_its_backends():
    assert _C.backends()[0] == "cpu"
    assert set(_C.backends()) <= {"cpu", "cuda"}
    assert _C.max_threads() >= 1


def test_launcher_rejects_unknown_dtype_code():
    with pytest.raises(ValueError, match="unsupported dtype code 9"):
        _C.cond_layer_norm_forward_cpu(9, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1e-5, False)


def test_launcher_rejects_bad_reduction_plan():
    x = torch.randn(6, 4)
    g = torch.randn(6, 4)
    gw = torch.empty(4)
    with pytest.raises(ValueError, match="group_rows must divide rows"):
        _C.cond_layer_norm_backward_cpu(
            0, g.data_ptr(), x.data_ptr(), 0, 0, 0, 0, gw.data_ptr(), 0, 6, 6, 4, 1e-5, False, 4, 1
        )


@pytest.mark.skipif("cuda" not in _native.BACKENDS, reason="built without CUDA kernels (no nvcc)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_launchers_fail_cleanly_without_a_gpu():
    with pytest.raises(RuntimeError, match="kexue CUDA error"):
        _C.cond_layer_norm_forward_cuda(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1e-5, False, 0)
    with pytest.raises(RuntimeError, match="kexue CUDA error"):
        _C.ema_update_cuda(_C.EmaLists([0], [0], [1], [1], [5]), 0.5, 0)
    sigmas = torch.empty(1)
    with pytest.raises(RuntimeError, match="kexue CUDA error"):
        _C.spectral_norm_power_iter_cuda(
            0, _C.MatrixLists([0], [16], [16], [16], [4], [4]), 1, 1e-12, sigmas.data_ptr(), 0
        )


def test_ema_launcher_validates_every_pair_before_writing():
    shadow, param = torch.zeros(4), torch.ones(4)
    lists = _C.EmaLists([0, 2], [0, 0], [shadow.data_ptr(), shadow.data_ptr()], [param.data_ptr()] * 2, [4, 4])
    with pytest.raises(ValueError, match=r"unsupported .* at index 1"):
        _C.ema_update_cpu(lists, 0.5)
    assert not shadow.any()  # the valid first pair was not updated
    with pytest.raises(ValueError, match="differ in length"):
        _C.ema_update_cpu(_C.EmaLists([0], [0], [shadow.data_ptr()], [], [4]), 0.5)


def test_missing_backend_is_a_clear_error():
    if "cuda" in _native.BACKENDS:
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _native.native("cond_layer_norm_forward", torch.device("cuda"))
