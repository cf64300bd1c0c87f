"""Keras 3 shim: ``model.fit`` through a pserver cluster.

Owns ``PSOptimizer`` (a ``keras.optimizers.Optimizer`` that pushes each step's
gradients and assigns the values the server's optimizer computed; keys are the
variables' ``path``) and ``PServerCallback`` (progress in the logs, an optional
safetensors checkpoint of the server's values per epoch, closing the client when
training ends). keras is imported by this module only. The optimizer runs Python
on every step, so compile the model with ``jit_compile=False`` (and, on the
TensorFlow backend, ``run_eagerly=True``); on the torch backend that is all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .client import Client


class PSOptimizer(keras.optimizers.Optimizer):  # type: ignore[misc]
    """Applies ``server_optimizer`` (default sgd, lr 0.01) on the server. Worker 0
    creates the keys from its variables on the first step; every worker then starts
    from the server's values."""

    def __init__(self, client: Client, server_optimizer: dict[str, Any] | None = None, *,
                 mode: str | None = None, staleness: int | None = None,
                 name: str = "pserver", **kwargs: Any) -> None:
        spec = dict(server_optimizer or {"name": "sgd", "lr": 0.01})
        super().__init__(learning_rate=float(spec.get("lr", 0.01)), name=name, **kwargs)
        self.client = client
        self.server_optimizer = spec
        self.mode, self.staleness = mode, staleness
        self._started = False

    def _start(self, variables: Sequence[Any]) -> None:
        values = {v.path: np.ascontiguousarray(keras.ops.convert_to_numpy(v.value))
                  for v in variables}
        if self.client.worker_id == 0:
            self.client.init(values, optimizer=self.server_optimizer, mode=self.mode,
                             staleness=self.staleness)
        self.client.barrier()
        self._assign(variables, self.client.pull(list(values)))
        self._started = True

    @staticmethod
    def _assign(variables: Sequence[Any], values: dict[str, np.ndarray[Any, Any]]) -> None:
        for v in variables:
            if v.path in values:
                v.assign(values[v.path].reshape(tuple(v.shape)))

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None
              ) -> None:
        variables = list(trainable_variables if trainable_variables is not None
                         else self._trainable_variables)
        if not self.built:
            self.build(variables)
        if not self._started:
            self._start(variables)
        pushed = {v.path: np.ascontiguousarray(keras.ops.convert_to_numpy(g))
                  for g, v in zip(grads, variables, strict=True) if g is not None}
        self._assign(variables, self.client.push_pull(pushed))
        self.iterations.assign_add(1)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(server_optimizer=self.server_optimizer, mode=self.mode,
                      staleness=self.staleness)
        return config


class PServerCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Adds ``pserver_steps`` to each epoch's logs, writes the server's values to
    ``checkpoint`` (a safetensors file, ``{epoch}`` formatted) after each epoch if
    given, and closes the client when training ends if ``close``."""

    def __init__(self, client: Client, checkpoint: str | None = None,
                 close: bool = False) -> None:
        super().__init__()
        self.client, self.checkpoint, self.close = client, checkpoint, close

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["pserver_steps"] = int(keras.ops.convert_to_numpy(
                self.model.optimizer.iterations))
        if self.checkpoint:
            from safetensors.numpy import save_file

            keys = list(self.client.keys())
            path = Path(self.checkpoint.format(epoch=epoch + 1))
            save_file({k: np.ascontiguousarray(v) for k, v in self.client.pull(keys).items()},
                      str(path))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.close:
            self.client.close()
