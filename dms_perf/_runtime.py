"""Process-wide set-up that must run before triton is imported.

Without a CUDA device the Triton kernels run in triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``); the variable is read when ``triton.jit`` decorates a kernel, so
``dms_perf`` sets it on import, before any of its kernel modules import triton.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
