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
        _C.ema_update_cuda(_C.TensorTable(2, 1, [1, 1], [0, 0], [5], "test"), 0.5, 0)
    sigmas = torch.empty(1)
    mats = _C.TensorTable(3, 2, [16, 16, 16], [0, 0, 0], [4, 4], "test")
    scratch_elems = _C.spectral_norm_scratch_elems_cuda(mats)
    with pytest.raises(RuntimeError, match="kexue CUDA error"):
        _C.spectral_norm_power_iter_cuda(0, mats, 1, 1e-12, sigmas.data_ptr(), 16, scratch_elems, 0)
    with pytest.raises(ValueError, match="scratch holds 1 elements, the launch needs 2"):
        _C.spectral_norm_power_iter_cuda(0, mats, 1, 1e-12, sigmas.data_ptr(), 16, scratch_elems - 1, 0)


def test_ema_launcher_validates_every_pair_before_writing():
    shadow, param = torch.zeros(4), torch.ones(4)
    pointers = [shadow.data_ptr(), param.data_ptr()] * 2
    table = _C.TensorTable(2, 1, pointers, [0, 0, 2, 0], [4, 4], "test")
    with pytest.raises(ValueError, match=r"unsupported .* at index 1"):
        _C.ema_update_cpu(table, 0.5)
    assert not shadow.any()  # the valid first pair was not updated


def test_table_rejects_lists_that_do_not_fit_its_layout():
    with pytest.raises(ValueError, match="my_op: the table's pointer, dtype and size lists do not fit 2 slots"):
        _C.TensorTable(2, 1, [1, 2, 3], [0, 0, 0], [4], "my_op")
    with pytest.raises(ValueError, match="my_op: the table's pointer, dtype and size lists do not fit"):
        _C.TensorTable(2, 1, [1, 2], [0, 0], [4, 4], "my_op")
    with pytest.raises(ValueError, match="my_op: unknown dtype code 7"):
        _C.TensorTable(2, 1, [1, 2], [0, 7], [4], "my_op")
    with pytest.raises(ValueError, match="my_op: negative size"):
        _C.TensorTable(2, 1, [1, 2], [0, 0], [-1], "my_op")
    table = _C.TensorTable(3, 2, [1, 2, 3, 4, 5, 6], [0] * 6, [1, 2, 3, 4], "my_op")
    assert (table.n, table.slots, table.sizes_per_entry) == (2, 3, 2)


def test_launchers_reject_a_table_of_another_layout():
    shadow, param = torch.zeros(4), torch.ones(4)
    ema_table = _C.TensorTable(2, 1, [shadow.data_ptr(), param.data_ptr()], [0, 0], [4], "test")
    sigmas = torch.empty(1)
    with pytest.raises(ValueError, match="spectral_norm: expected a table of 3 slots and 2 sizes per entry, got 2 and"):
        _C.spectral_norm_power_iter_cpu(0, ema_table, 1, 1e-12, sigmas.data_ptr())
    with pytest.raises(ValueError, match="spectral_norm: expected a table of 3 slots"):
        _C.spectral_sigma_cpu(0, ema_table, sigmas.data_ptr())
    matrix_table = _C.TensorTable(3, 2, [shadow.data_ptr()] * 3, [0] * 3, [2, 2], "test")
    with pytest.raises(ValueError, match="ema_update: expected a table of 2 slots and 1 sizes per entry, got 3 and 2"):
        _C.ema_update_cpu(matrix_table, 0.5)
    assert not shadow.any()


def test_spectral_launcher_rejects_vectors_of_another_dtype():
    w, u, v = torch.ones(2, 2), torch.ones(2, dtype=torch.float64), torch.ones(2)
    table = _C.TensorTable(3, 2, [w.data_ptr(), u.data_ptr(), v.data_ptr()], [0, 1, 0], [2, 2], "test")
    with pytest.raises(ValueError, match="u / v at index 0 are not of the vector dtype code 0"):
        _C.spectral_norm_power_iter_cpu(0, table, 1, 1e-12, torch.empty(1).data_ptr())
    assert (u == 1).all() and (v == 1).all()


def test_missing_backend_is_a_clear_error():
    if "cuda" in _native.BACKENDS:
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _native.native("cond_layer_norm_forward", torch.device("cuda"))
