"""Optimizer specifications: parsing, validation and the update step.

Owns the meaning of a key's ``optimizer`` dict (names and hyperparameters
follow ``torch.optim``) and applies one update to one slice of a parameter
through ``pserver.kernels``. Deterministic: the same inputs give the same
bits. Imports kernels, never sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pserver import kernels
from pserver.protocol.errors import InvalidArgument

DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "sgd", "lr": 0.01}
KNOWN_NAMES = ("sum", "sgd", "momentum", "adam", "adamw", "adagrad")
AVAILABLE: dict[str, dict[str, float]] = {
    # name -> accepted hyperparameters with defaults
    "sum": {},
    "sgd": {"lr": 0.01},
}


@dataclass(frozen=True)
class OptimizerSpec:
    """A validated optimizer: its name and every hyperparameter, defaults filled in."""

    name: str
    params: tuple[tuple[str, float], ...]
    lr: float = field(init=False, repr=False, compare=False)  # from params, for the hot path

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> OptimizerSpec:
        if raw is None:
            raw = DEFAULT_OPTIMIZER
        if not isinstance(raw, dict):
            raise InvalidArgument(f"optimizer must be a dict such as {DEFAULT_OPTIMIZER}")
        raw = dict(raw)
        name = raw.pop("name", None)
        if name not in KNOWN_NAMES:
            raise InvalidArgument(f"optimizer name {name!r} is not one of {list(KNOWN_NAMES)}")
        if name not in AVAILABLE:
            raise InvalidArgument(
                f"optimizer {name!r} is not available in this build yet "
                f"(available: {sorted(AVAILABLE)})"
            )
        accepted = AVAILABLE[name]
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            raise InvalidArgument(
                f"optimizer {name!r} takes {sorted(accepted) or 'no hyperparameters'}, "
                f"not {unknown}"
            )
        params = dict(accepted)
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
                raise InvalidArgument(f"{name} hyperparameter {k!r} must be a finite number")
            params[k] = float(v)
        if params.get("lr", 0.0) < 0:
            raise InvalidArgument("lr must be >= 0")
        return cls(name, tuple(sorted(params.items())))

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", dict(self.params).get("lr", 0.0))

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.params)}

    def apply(
        self,
        param: np.ndarray[Any, Any],
        grad: np.ndarray[Any, Any],
        scratch: np.ndarray[Any, Any] | None = None,
    ) -> None:
        """Apply one update of ``grad`` to ``param`` (same-length 1-D slices);
        ``scratch`` is optional caller-owned working memory of param's dtype."""
        if self.name == "sum":
            kernels.accumulate(param, grad)
        else:  # sgd
            kernels.sgd(param, grad, self.lr, scratch)
