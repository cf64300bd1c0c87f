"""Optimizer specifications: parsing, validation, state, and the update step.

Owns the meaning of a key's ``optimizer`` dict. Names and hyperparameters
follow ``torch.optim`` (``sgd``/``momentum`` = SGD, ``adam``, ``adamw``,
``adagrad``), plus ``sum`` (the server only adds) and ``clip_value`` (clip each
gradient element to [-c, c] before the update). Each stored part keeps its own
optimizer state (slot arrays and a step count); updates run through
``pserver.kernels`` and are deterministic. Imports kernels, never sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pserver import kernels
from pserver.protocol.errors import InvalidArgument

Array = np.ndarray[Any, Any]

DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "sgd", "lr": 0.01}
KNOWN_NAMES = ("sum", "sgd", "momentum", "adam", "adamw", "adagrad")

# name -> accepted hyperparameters with their defaults (torch.optim's, except
# `momentum`, which is SGD with momentum 0.9 by default).
_SGD = {"lr": 0.01, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
        "nesterov": False, "clip_value": 0.0}
_ADAM = {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
         "amsgrad": False, "clip_value": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "sum": {},
    "sgd": _SGD,
    "momentum": {**_SGD, "momentum": 0.9},
    "adam": _ADAM,
    "adamw": {**_ADAM, "weight_decay": 0.01},
    "adagrad": {"lr": 0.01, "lr_decay": 0.0, "weight_decay": 0.0,
                "initial_accumulator_value": 0.0, "eps": 1e-10, "clip_value": 0.0},
}


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise InvalidArgument(f"{name} hyperparameter {key!r} must be a finite number")
    return float(value)


def _check(name: str, p: dict[str, Any]) -> None:
    for key in ("lr", "weight_decay", "eps", "lr_decay", "clip_value", "momentum",
                "initial_accumulator_value"):
        if p.get(key, 0.0) < 0:
            raise InvalidArgument(f"{name}: {key} must be >= 0")
    if "betas" in p and not all(0.0 <= b < 1.0 for b in p["betas"]):
        raise InvalidArgument(f"{name}: betas must lie in [0, 1)")
    if p.get("nesterov") and (p["momentum"] <= 0 or p["dampening"] != 0):
        raise InvalidArgument(f"{name}: nesterov needs momentum > 0 and dampening 0")


@dataclass(frozen=True)
class OptimizerSpec:
    """A validated optimizer: its name and every hyperparameter, defaults filled in."""

    name: str
    params: tuple[tuple[str, Any], ...]
    hp: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hp", dict(self.params))

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
        accepted = DEFAULTS[name]
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            raise InvalidArgument(
                f"optimizer {name!r} takes {sorted(accepted) or 'no hyperparameters'}, "
                f"not {unknown}"
            )
        params = dict(accepted)
        for key, value in raw.items():
            default = accepted[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise InvalidArgument(f"{name} hyperparameter {key!r} must be true or false")
                params[key] = value
            elif isinstance(default, tuple):
                if not isinstance(value, list | tuple) or len(value) != len(default):
                    raise InvalidArgument(f"{name} hyperparameter {key!r} must be a pair")
                params[key] = tuple(_number(name, key, v) for v in value)
            else:
                params[key] = _number(name, key, value)
        _check(name, params)
        return cls(name, tuple(sorted(params.items())))

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in self.params}}

    def new_state(self, count: int, dtype: np.dtype[Any]) -> dict[str, Array]:
        """The optimizer's slot arrays for a part of ``count`` elements."""
        hp = self.hp
        if self.name in ("sgd", "momentum"):
            return {"momentum_buffer": np.zeros(count, dtype)} if hp["momentum"] else {}
        if self.name in ("adam", "adamw"):
            state = {"exp_avg": np.zeros(count, dtype), "exp_avg_sq": np.zeros(count, dtype)}
            if hp["amsgrad"]:
                state["max_exp_avg_sq"] = np.zeros(count, dtype)
            return state
        if self.name == "adagrad":
            return {"sum": np.full(count, hp["initial_accumulator_value"], dtype)}
        return {}

    def apply(self, param: Array, grad: Array, state: Mapping[str, Array], step: int,
              backend: str | None = None) -> None:
        """Apply update number ``step`` (from 1) of ``grad`` to ``param``; ``state``
        holds the slot arrays sliced like ``param``. ``backend`` as in ``kernels``
        (None: chosen per call)."""
        hp, name = self.hp, self.name
        if name == "sum":
            kernels.accumulate(param, grad, backend=backend)
        elif name in ("sgd", "momentum"):
            kernels.sgd(param, grad, lr=hp["lr"], weight_decay=hp["weight_decay"],
                        momentum=hp["momentum"], dampening=hp["dampening"],
                        nesterov=hp["nesterov"], momentum_buffer=state.get("momentum_buffer"),
                        first=step == 1, clip_value=hp["clip_value"], backend=backend)
        elif name in ("adam", "adamw"):
            beta1, beta2 = hp["betas"]
            kernels.adam(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step,
                         lr=hp["lr"], beta1=beta1, beta2=beta2, eps=hp["eps"],
                         weight_decay=hp["weight_decay"], decoupled=name == "adamw",
                         max_exp_avg_sq=state.get("max_exp_avg_sq"),
                         clip_value=hp["clip_value"], backend=backend)
        else:
            kernels.adagrad(param, grad, state["sum"], step=step, lr=hp["lr"],
                            lr_decay=hp["lr_decay"], weight_decay=hp["weight_decay"],
                            eps=hp["eps"], clip_value=hp["clip_value"], backend=backend)


def warm_up(dtype: str = "float32") -> None:
    """Run every optimizer (and the sync-step mean), dense and on table rows, once on
    small and large arrays, so numba compiles or loads its kernels now rather than on
    a first update, where a stall of seconds would look like a dead replica to its
    peers."""
    from pserver.kernels.dispatch import SERIAL_BELOW

    from .tables import Table, TableSpec  # tables imports this module

    dim = 64
    for n in (16, SERIAL_BELOW + 16):
        grad = np.ones(n, dtype)
        rows = -(-n // dim)
        # adam takes the branch-free kernel, adamw (weight decay 0.01) the general one
        for name in ("sum", "sgd", "momentum", "adam", "adamw", "adagrad"):
            raw = {"name": name, "momentum": 0.9} if name == "momentum" else {"name": name}
            spec = OptimizerSpec.parse(raw)
            param = np.zeros(n, dtype)
            spec.apply(param, grad, spec.new_state(n, param.dtype), 1)
            table = Table(TableSpec.parse({"table": "warm-up", "dim": dim, "dtype": dtype,
                                           "optimizer": raw}))
            table.push(np.arange(rows, dtype=np.uint64), np.ones((rows, dim), dtype))
        kernels.aggregate([grad, grad], np.empty(n, dtype), mean=True)
