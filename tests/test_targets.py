"""The target axis itself (targets.py, conftest.py): a CPU target runs its test at its ISA level
and puts the level in use back afterwards; every level the CPU supports is a target."""

import pytest

from kexue_fast import _C
from targets import CPU_TARGETS, TARGETS, cpu_isa, target_params


def test_every_supported_level_is_a_target():
    levels = [t.isa for t in CPU_TARGETS]
    assert levels == list(_C.cpu_isas())
    assert [t.device for t in TARGETS if t not in CPU_TARGETS] == ["cuda"]


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
def test_a_cpu_target_runs_at_its_level(target):
    assert _C.cpu_isa() == target.isa


def test_the_level_in_use_comes_back_after_a_block_and_after_an_error():
    before = _C.cpu_isa()
    other = next((level for level in _C.cpu_isas() if level != before), before)  # one level: no other
    with cpu_isa(other):
        assert _C.cpu_isa() == other
    assert _C.cpu_isa() == before
    with pytest.raises(ValueError), cpu_isa("no-such-level"):
        pass
    assert _C.cpu_isa() == before
