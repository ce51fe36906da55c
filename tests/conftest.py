import os

import pytest
import torch

import kexue_fast  # noqa: F401  (registers torch.ops.kexue.*)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    # The gpu tests need a CUDA device; say why they do not run here.
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (run on the lent GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
