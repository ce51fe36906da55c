"""Where the Triton variants run (kexue_fast/_library.py, _on_triton_devices): on CUDA, and on CPU
only under the interpreter. In this process (no TRITON_INTERPRET) every Triton variant called on
CPU must raise the one clear error before it runs or writes anything."""

import pytest
import torch

from kexue_fast._library import REGISTERED, TRITON_AVAILABLE, TRITON_INTERPRET

pytestmark = pytest.mark.skipif(
    not TRITON_AVAILABLE or TRITON_INTERPRET, reason="checks the CPU error without the Triton interpreter"
)

TRITON_OPS = sorted(name for name, reg in REGISTERED.items() if reg.triton)
EXPECTED_TRITON_OPS = {
    "cond_layer_norm_triton", "cond_layer_norm_backward_triton", "ema_update_triton_",
    "langevin_step_triton_", "philox_normal_triton", "spectral_norm_power_iter_triton_",
}  # fmt: skip


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def test_every_triton_variant_is_checked():
    assert set(TRITON_OPS) >= EXPECTED_TRITON_OPS


@pytest.mark.parametrize("name", TRITON_OPS)
def test_triton_variant_on_cpu_raises_a_clear_error_and_writes_nothing(name):
    reg = REGISTERED[name]
    checked = 0
    for args in reg.samples(torch.device("cpu")):
        tensors = list(_tensors(args))
        if not tensors and name != "philox_normal_triton":
            continue  # empty lists: no device, nothing runs
        before = [t.detach().clone() for t in tensors]
        with pytest.raises(RuntimeError, match=rf"^kexue::{name}: Triton kernels run on CUDA tensors, or on CPU .*cpu"):
            reg.op(*args)
        assert all(torch.equal(t, b) for t, b in zip(tensors, before))
        checked += 1
    assert checked > 0


def test_the_error_names_the_argument():
    shadow, params = [torch.zeros(3)], [torch.ones(3)]
    with pytest.raises(
        RuntimeError, match=r"TRITON_INTERPRET=1 is set before kexue_fast is imported; shadow\[0\] is on cpu"
    ):
        torch.ops.kexue.ema_update_triton_(shadow, params, 0.5)
    with pytest.raises(RuntimeError, match=r"; device is cpu$"):
        torch.ops.kexue.philox_normal_triton([4], 0, 0, None, "cpu")
    assert torch.ops.kexue.philox_normal_triton([4], 0, 0, None, "meta").shape == (4,)  # meta runs nothing
