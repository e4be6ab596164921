"""The outer optimizer: applied by every member to the same aggregate, so all hold the same bits.

θ_{r+1} = θ_r − lr · u, where u is the aggregate pseudo-gradient g (sgd, no momentum),
the momentum buffer (sgd with momentum) or g + μ·m (Nesterov). With sgd, lr 1 and no
momentum this is plain parameter averaging.
"""

from __future__ import annotations

import torch


class OuterOptimizer:
    def __init__(self, *, kind: str, lr: float, momentum: float, numel: int):
        if kind not in ("sgd", "nesterov"):
            raise ValueError(f"outer optimizer kind {kind!r} is unknown; use 'sgd' or 'nesterov'")
        self.kind, self.lr, self.momentum = kind, float(lr), float(momentum)
        self.buf: torch.Tensor | None = torch.zeros(numel, dtype=torch.float32) if momentum > 0 else None

    def step(self, theta: torch.Tensor, pseudo_grad: torch.Tensor) -> torch.Tensor:
        """Return θ_{r+1}; `theta` is not modified. Deterministic float32 elementwise ops."""
        if theta.shape != pseudo_grad.shape or pseudo_grad.dtype != torch.float32:
            raise ValueError(f"outer step: aggregate {tuple(pseudo_grad.shape)}/{pseudo_grad.dtype} "
                             f"does not match parameters {tuple(theta.shape)}/float32")
        if self.buf is None:
            update = pseudo_grad
        else:
            self.buf.mul_(self.momentum).add_(pseudo_grad)
            update = pseudo_grad.add(self.buf, alpha=self.momentum) if self.kind == "nesterov" else self.buf
        if self.lr == 1.0:
            return theta.sub(update)
        return theta.sub(update, alpha=self.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.buf is None else {"momentum": self.buf.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, copy: bool = True) -> None:
        """Take the outer state; `copy=False` adopts the given tensors (a freshly downloaded state)."""
        if self.buf is None:
            if state:
                raise ValueError("outer state has a momentum buffer but the spec's outer optimizer has no momentum")
            return
        buf = state.get("momentum")
        if buf is None or buf.shape != self.buf.shape or buf.dtype != torch.float32:
            raise ValueError("outer state: momentum buffer is missing or has the wrong shape/dtype for this spec")
        self.buf = buf.clone() if copy else buf


def outer_state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of an outer-optimizer state (sorted names, float32 bytes); published beside the model hash."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + b"\0")
        h.update(state[name].detach().contiguous().to(torch.float32).numpy().data.cast("B"))  # a view, no copy
    return h.hexdigest()
