"""Process-wide set-up that must run before the Triton kernels are decorated.

Without a CUDA device the Triton kernels run in triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``). Triton reads the variable when ``triton.jit`` decorates a function
(``triton.knobs.runtime.interpret`` reads the environment each time in triton 3.x), so ``dms_perf``
sets it on import, before any of its kernel modules is imported.

When triton itself was imported first with the variable unset (directly, or through kvpress,
transformers or torch), its own library functions (``tl.sum``, ``tl.max``, ``tl.cumsum``, ... in
``triton.language.standard`` and ``triton.language.random``) were already decorated for the compiler,
and an interpreted kernel calling one of them fails with "Cannot call @triton.jit'd outside of the
scope of a kernel". ``_rebuild_triton_library_for_interpreter`` re-runs those modules with the
variable set and rebinds their re-exports (``triton.language.sum`` ...), so any import order works.
"""

import importlib
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _stale_triton_library_modules() -> dict:
    """The loaded ``triton.language*`` modules that define functions decorated for the compiler."""
    jit = sys.modules.get("triton.runtime.jit")
    if jit is None:
        return {}
    stale = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, jit.JITFunction) and getattr(value.fn, "__module__", None) == name:
                stale[name] = module
                break
    return stale


def _rebuild_triton_library_for_interpreter() -> None:
    """Re-decorate triton's library jit functions for the interpreter (see the module docstring)."""
    stale = _stale_triton_library_modules()
    if not stale:
        return
    jit = sys.modules["triton.runtime.jit"]
    for module in stale.values():
        importlib.reload(module)  # its @jit now sees TRITON_INTERPRET=1; tensor methods are re-attached too
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton" or name.startswith("triton.")):
            continue
        for attr, value in list(vars(module).items()):
            if not isinstance(value, jit.JITFunction):
                continue
            home = stale.get(getattr(value.fn, "__module__", None))
            fresh = getattr(home, getattr(value.fn, "__name__", ""), None) if home is not None else None
            if fresh is not None and not isinstance(fresh, jit.JITFunction):
                setattr(module, attr, fresh)
    left = _stale_triton_library_modules()
    if left:
        raise ImportError(
            f"triton was imported before dms_perf without TRITON_INTERPRET=1, and its library functions in "
            f"{', '.join(sorted(left))} could not be rebuilt for the interpreter (the only way Triton kernels run "
            f"without a CUDA GPU). Set TRITON_INTERPRET=1 in the environment, or import dms_perf before triton."
        )


if not HAS_CUDA and INTERPRET and "triton.language" in sys.modules:
    _rebuild_triton_library_for_interpreter()


def default_device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
