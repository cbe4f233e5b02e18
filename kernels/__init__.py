"""The eager / fused switch, in one place.

Every kernel family here ends with `<name>` (dispatches on this mode), `<name>_triton` (a torch.ops.tritonchat.*
operator, so torch.compile(fullgraph=True) traces a fused model whole) and `<name>_reference` (plain PyTorch, same
signature). Set by `kernels.set_mode`, $TRITONCHAT_KERNELS or `--kernels`; "auto" = fused when CUDA is available.
Fused on CPU needs TRITON_INTERPRET=1 set before triton is imported (slow; tests only).
"""
import os

import torch

MODES = ("eager", "fused", "auto")
_mode = None  # resolved mode: "eager" or "fused"

def resolve(mode):
    """'eager' or 'fused' for a mode of MODES: 'auto' is fused when CUDA is available."""
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}: choose one of {', '.join(MODES)}")
    return ("fused" if torch.cuda.is_available() else "eager") if mode == "auto" else mode

def set_mode(mode):
    """Set the kernel mode for the whole process: 'eager', 'fused' or 'auto' (resolved here)."""
    global _mode
    mode = resolve(mode)
    if mode == "fused" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fused kernels need a CUDA GPU; on CPU set TRITON_INTERPRET=1 before starting Python "
                           "(slow, for tests) or use --kernels eager")
    _mode = mode

def get_mode():
    """The resolved mode ('eager' or 'fused'); the first call reads $TRITONCHAT_KERNELS (default 'auto')."""
    if _mode is None:
        set_mode(os.environ.get("TRITONCHAT_KERNELS", "auto"))
    return _mode

def use_fused():
    """True when the kernel families dispatch to Triton (resolved mode 'fused')."""
    return get_mode() == "fused"

def add_argument(parser):
    """The `--kernels eager|fused|auto` flag every entry point shares."""
    parser.add_argument("--kernels", choices=MODES, default=os.environ.get("TRITONCHAT_KERNELS", "auto"),
                        help="eager = PyTorch references, fused = Triton kernels, auto = fused on CUDA else eager")
