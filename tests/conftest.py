import hashlib
import os
import tempfile

import pytest
import torch

import kexue_fast  # noqa: F401  (registers torch.ops.kexue.*)
from kexue_fast import _native
from kexue_fast._library import REGISTERED
from targets import Target, cpu_isa


def _inductor_cache_of_these_schemas() -> str:
    """Inductor's on-disk graph cache does not key on a custom op's schema: after an op gains an
    argument, a graph compiled against the old schema is reused and calls the op wrongly. The
    tests use a cache directory of their own per set of schemas (set before anything compiles)."""
    schemas = "\n".join(sorted(str(reg.op._schema) for reg in REGISTERED.values()))
    digest = hashlib.sha256(schemas.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"torchinductor_kexue_{digest}")


os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache_of_these_schemas()


def _target(item) -> Target | None:
    """The target a test case runs on (its ``target`` parameter), if it has one."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("target") if callspec is not None else None


@pytest.hookimpl(tryfirst=True)  # before -m selects by the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        target = _target(item)
        if target is not None and target.device == "cuda":
            item.add_marker(pytest.mark.gpu)
    # The gpu tests need a CUDA device; say why they do not run here.
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (run on the lent GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _on_target(request):
    """Runs a test case with a CPU target at that target's ISA level; fails a native GPU case
    clearly when a GPU is present but the build has no CUDA kernels."""
    keywords = request.node.keywords
    if "gpu" in keywords and "triton" not in keywords and "cuda" not in _native.BACKENDS:
        pytest.fail("a CUDA device is present but kexue_fast was built without CUDA kernels")
    target = _target(request.node)
    if target is None or target.isa is None:
        yield
        return
    with cpu_isa(target.isa):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
