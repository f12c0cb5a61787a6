"""Every test in tests/gpu needs CUDA: without it they are collected and skipped (never errors).

``tests/conftest.py`` (loaded first) puts ``tests/`` on ``sys.path``, so ``tiny_models``,
``distributed`` and ``conftest.randomize_adapters`` import here as in the CPU suite. fp32
results are compared with TF32 off (matmuls and cuDNN in full fp32) for every test here,
restored afterwards.
"""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config, items):
    # The hook sees the whole session's items: mark only those under tests/gpu.
    if torch.cuda.is_available():
        return
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(NO_CUDA)


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """TF32 off for the duration of each test (fp32 comparisons against CPU need full precision)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
