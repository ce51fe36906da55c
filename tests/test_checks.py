"""The shared argument checks of kexue_fast._checks against brute force."""

import random

import pytest
import torch

from kexue_fast import _checks, _tables


def _elements(t: torch.Tensor) -> set[int]:
    """The storage offsets ``t`` covers, listed one by one (the slow, obvious way)."""
    offsets = torch.as_strided(torch.arange(t.untyped_storage().nbytes() // 4), t.shape, t.stride(), t.storage_offset())
    return set(offsets.flatten().tolist())


@pytest.mark.parametrize("n_tensors", [2, 5, 8, 9, 20])
def test_disjoint_agrees_with_brute_force_on_random_slices(n_tensors):
    rng = random.Random(n_tensors)
    for _ in range(200):
        storage = torch.zeros(64)
        tensors, written = [], []
        for _ in range(n_tensors):
            start = rng.randrange(64)
            tensors.append(storage[start : start + rng.randrange(0, 12)])
            written.append(rng.random() < 0.4)
        spans = [_elements(t) for t in tensors]
        expected = any((written[a] or written[b]) and spans[a] & spans[b] for a in range(n_tensors) for b in range(a))
        names = [(f"t{i}", t) for i, t in enumerate(tensors)]
        try:
            _checks.disjoint(
                "op", [n for n, w in zip(names, written) if w], [n for n, w in zip(names, written) if not w]
            )
            clashed = False
        except ValueError as error:
            clashed = True
            first, second = (int(word[1:]) for word in str(error).split(": ", 1)[1].split(" share")[0].split(" and "))
            assert spans[first] & spans[second] and (written[first] or written[second])
        assert clashed == expected


@pytest.mark.parametrize("written", [(True, False), (False, True), (True, True), (False, False)])
def test_table_overlapping_agrees_with_brute_force(written):
    """``_C.TensorTable.overlapping`` (the C++ sweep of the launchers' tables) on random slices of
    one storage, in a table of (matrix, vector) entries whose matrix spans rows·cols elements
    and vector cols, as spectral norm's weight and v do."""
    rng = random.Random(sum(written) + 2 * written[0])
    storage = torch.zeros(200)
    for _ in range(300):
        matrices, vectors, sizes = [], [], []
        for _ in range(rng.randrange(1, 7)):
            rows, cols = rng.randrange(0, 4), rng.randrange(0, 4)
            start, at = rng.randrange(150), rng.randrange(150)
            matrices.append(storage[start : start + rows * cols].view(rows, cols))
            vectors.append(storage[at : at + cols])
            sizes += [rows, cols]
        table = _tables.build("test", (matrices, vectors), sizes, 2)
        tensors = [t for pair in zip(matrices, vectors) for t in pair]
        flags = [flag for _ in matrices for flag in written]
        spans = [_elements(t) for t in tensors]
        expected = any((flags[a] or flags[b]) and spans[a] & spans[b] for a in range(len(tensors)) for b in range(a))
        assert table.overlapping([[0, 1], [1]], list(written)) == expected


def test_table_overlapping_refuses_a_bad_layout():
    table = _tables.build("test", ([torch.zeros(3)],), [3], 1)
    with pytest.raises(ValueError, match="an extent and a written flag per slot"):
        table.overlapping([[0], [0]], [True])
    with pytest.raises(ValueError, match="size index is out of range"):
        table.overlapping([[1]], [True])


@pytest.mark.parametrize("n_others", [0, 8])  # the pairwise and the sorted search
def test_disjoint_compares_the_span_of_a_strided_tensor(n_others):
    storage = torch.zeros(40)
    strided, inside = storage[0:20:2], storage[15:16]  # element 15 lies in the span, between two elements
    others = [torch.zeros(3) for _ in range(n_others)]
    with pytest.raises(ValueError, match=r"read\[0\] and written\[0\] share memory"):
        _checks.disjoint("op", [("written", [strided, *others])], [("read", [inside])])


def test_disjoint_names_list_entries():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match=r"shadow\[2\] and shadow\[0\] share memory"):
        _checks.disjoint("op", [("shadow", [a, torch.zeros(3), a[1:]])])


@pytest.mark.parametrize(
    "make,overlaps",
    [
        (lambda: torch.zeros(3, 4), False),
        (lambda: torch.zeros(3, 4).t(), False),
        (lambda: torch.zeros(1, 4).expand(3, 4), True),
        (lambda: torch.zeros(20).as_strided((3, 4), (3, 1)), True),
        (lambda: torch.zeros(20).as_strided((3, 4), (4, 1)), False),
        (lambda: torch.zeros(100).as_strided((3, 3), (1, 5)), False),
        (lambda: torch.zeros(100).as_strided((4, 3), (1, 3)), True),
    ],
)
def test_overlaps_itself(make, overlaps):
    t = make()
    assert _checks.overlaps_itself(t) == overlaps
    assert overlaps == (len(_elements(t)) < t.numel())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e39, -1e39])
def test_number_rejects_non_finite_and_float32_overflow(value):
    with pytest.raises(ValueError, match="step"):
        _checks.number("op", "step", value)


def test_number_allows_float64_range_when_asked():
    _checks.number("op", "eps", 1e39, float32=False)
    with pytest.raises(TypeError, match="eps must be a number, got bool"):
        _checks.number("op", "eps", True)
