"""Count what one call of the fused operator asks of the device (CPU, Triton interpreter).

Run as a script with ``TRITON_INTERPRET=1`` in the environment; prints one JSON line. Counted:
every Triton launch (one each, whatever the interpreter does inside it) and every torch
operation that writes memory (fills, casts, copies, reductions, arithmetic), seen by a
``TorchDispatchMode``; allocations (``empty*``) and views are not counted. Operations that
make the host wait for the device (``.item()``, ``nonzero``, copies to the CPU of device
tensors, ...) are listed apart.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
# Operators that wait for the device: reading a value back, or an output size that depends on data.
SYNCS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "unique", "masked_select"}


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class DeviceOpCounter(TorchDispatchMode):
    """Records ``launch:<kernel>`` for each Triton launch and ``aten:<op>`` for each torch op
    that writes memory; ``syncs`` lists host synchronisations."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []
        self._in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if not self._in_launch:
            if name in SYNCS:
                self.syncs.append(name)
            if name not in ALLOCATIONS and not _is_view(func) and name not in SYNCS:
                self.ops.append(f"aten:{name}")
        return func(*args, **kwargs)

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        counter = self
        self._run = InterpretedFunction.run

        def run(fn, *args, **kwargs):
            counter.ops.append(f"launch:{fn.__name__}")
            counter._in_launch += 1
            try:
                return counter._run(fn, *args, **kwargs)
            finally:
                counter._in_launch -= 1

        InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run
        return super().__exit__(*exc)


def count(B: int = 2, H: int = 3, N: int = 197, D: int = 64, M: int = 30, dtype: str = "float32") -> dict:
    """Device operations of one forward and one forward+backward call of the fused operator."""
    from anchorformer.ops.anchor_attention.triton import anchor_attention_triton

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    qk, v, grad = (torch.randn(B, H, N, D, generator=g).to(dt) for _ in range(3))
    u = torch.randn(M, D, generator=g).to(dt)
    leaves = [t.requires_grad_(True) for t in (qk, v, u)]
    with DeviceOpCounter() as fwd:  # the first call also plans: host work only, nothing to count
        out = anchor_attention_triton(*leaves)
    with DeviceOpCounter() as bwd:
        out.backward(grad)
    with torch.no_grad(), DeviceOpCounter() as infer:
        anchor_attention_triton(qk, v, u)
    return {
        "forward": fwd.ops,
        "backward": bwd.ops,
        "inference": infer.ops,
        "syncs": fwd.syncs + bwd.syncs + infer.syncs,
        "grad_layouts_match": all(t.grad.stride() == t.stride() for t in leaves),
    }


if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    print("COUNTS " + json.dumps(count(**kwargs)))
