import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from tiny_models import FAMILY_NAMES  # noqa: E402


class OpNames(TorchDispatchMode):
    """The name of every aten op run inside it, and each grouped GEMM's operand dtypes."""

    def __init__(self):
        super().__init__()
        self.names, self.grouped_mm_dtypes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        if self.names[-1] == "_grouped_mm":
            self.grouped_mm_dtypes.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture
def batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # right padding on the first row
    return {"input_ids": ids, "attention_mask": mask}


def randomize_adapters(model, std=0.1, seed=0):
    """Give every adapter parameter a non-trivial value (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "lora_A" in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif p.requires_grad and "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
