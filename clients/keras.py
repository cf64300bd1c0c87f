"""Keras 3 shim: ``model.fit`` through a pserver cluster, on the torch and the
TensorFlow backends.

- ``PSOptimizer``: a ``keras.optimizers.Optimizer`` that pushes each step's
  gradients and assigns the values the server's optimizer computed; keys are the
  variables' ``path``. Worker 0 creates the keys on the first step; every worker
  then starts from the server's values.
- ``PSEmbedding``: an embedding layer whose rows live in a sparse server table
  (``Client.create_table``, which every worker calls: the same table again is a
  no-op, another width raises ``ShapeMismatch``). Each call pulls the rows of the
  batch's unique ids and gathers them by the inverse index; backward pushes the
  unique rows' gradients (``push_rows``) and the table's optimizer (adagrad by
  default) applies them on the server at once, whatever the dense keys' mode. The
  push is the custom gradient of a zero scalar anchor weight, which is what makes
  backward reach the layer; Keras optimizers assign the anchor its (zero) gradient
  (``overwrite_with_gradient``) and ``PSOptimizer`` does the same and keeps it off
  the server. So the rows train with ``PSOptimizer`` or with any ordinary Keras
  optimizer for the other layers; the rows get the plain gradients of the loss
  backward ran on: no gradient clipping, and no loss-scaling optimizer
  (``LossScaleOptimizer``, ``loss_scale_factor``), whose scaled gradients would be
  pushed as they are. Give the ids an integer ``keras.Input`` dtype (``"int64"``).
- ``PServerCallback``: progress in the logs, an optional safetensors checkpoint of
  the server's dense values per epoch, closing the client when training ends.

keras is imported by this module only. Both run Python with concrete values on
every step, so compile with ``jit_compile=False`` and, on the TensorFlow backend,
``run_eagerly=True`` (a traced step makes ``PSEmbedding`` raise); on the torch
backend that is all. The JAX backend is not supported: its steps are traced.
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
    from the server's values. Variables whose ``overwrite_with_gradient`` is set (the
    anchors of ``PSEmbedding`` layers, float8 scales) are assigned their gradient, as
    Keras optimizers do, and are not keys on the server."""

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
        values = {v.path: np.asarray(keras.ops.convert_to_numpy(v.value), order="C")
                  for v in variables}
        if self.client.worker_id == 0 and values:
            self.client.init(values, optimizer=self.server_optimizer, mode=self.mode,
                             staleness=self.staleness)
        self.client.barrier()
        if values:
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
        dense = [v for v in variables if not _overwritten(v)]
        if not self._started:
            self._start(dense)
        pushed: dict[str, np.ndarray[Any, Any]] = {}
        for g, v in zip(grads, variables, strict=True):
            if g is None:
                continue
            if _overwritten(v):
                v.assign(g)
            else:
                pushed[v.path] = np.asarray(keras.ops.convert_to_numpy(g), order="C")
        if pushed:
            self._assign(dense, self.client.push_pull(pushed))
        self.iterations.assign_add(1)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(server_optimizer=self.server_optimizer, mode=self.mode,
                      staleness=self.staleness)
        return config


def _overwritten(variable: Any) -> bool:
    """Whether Keras assigns this variable its gradient instead of optimizing it."""
    return bool(getattr(variable, "overwrite_with_gradient", False))


def _shapes_only(inputs: Any) -> bool:
    """Whether keras only works out the output's shape (``compute_output_spec``, as
    ``fit`` does before its first step: meta tensors on torch)."""
    try:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope
    except ImportError:  # moved (keras 3.15 has it there): the torch sign at least
        return getattr(getattr(inputs, "device", None), "type", None) == "meta"
    return bool(in_symbolic_scope())


@keras.saving.register_keras_serializable(package="pserver")
class PSEmbedding(keras.layers.Layer):  # type: ignore[misc]
    """``keras.layers.Embedding`` whose rows live in the server table ``table`` of
    ``embedding_dim``-wide float32 rows (see the module): rows are pulled per batch and
    their gradients pushed in backward; the table's ``optimizer`` (a server optimizer
    spec, default adagrad lr 0.01) updates them, and rows never pushed read as
    ``init`` (``("normal", std)``, ``("uniform", a, b)`` or ``("zeros",)``). Ids are
    integers (int64 ids are taken as their uint64 bits); the table grows as ids appear,
    so no input_dim is needed. Outputs have the shape of the ids plus
    ``embedding_dim``. ``get_config`` holds everything but the client (a connection):
    ``PSEmbedding.from_config(config, client=client)`` rebuilds the layer."""

    def __init__(self, client: Client, table: str, embedding_dim: int, *,
                 optimizer: dict[str, Any] | None = None,
                 init: Sequence[Any] = ("normal", 0.01), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, not {embedding_dim}")
        self.client = client
        self.table, self.embedding_dim = table, int(embedding_dim)
        self.table_optimizer = None if optimizer is None else dict(optimizer)
        self.init = tuple(init)
        client.create_table(table, self.embedding_dim, optimizer=self.table_optimizer,
                            init=self.init)

    def build(self, input_shape: Any = None) -> None:
        # Backward runs only towards trainable weights, so the rows hang on one: a
        # zero scalar whose gradient is zero and is assigned, never optimized.
        self.anchor = self.add_weight(name="pserver_anchor", shape=(), initializer="zeros",
                                      trainable=True)
        self.anchor.overwrite_with_gradient = True

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return (*input_shape, self.embedding_dim)

    def call(self, inputs: Any) -> Any:
        if _shapes_only(inputs):  # a placeholder of the right (maybe unknown) shape
            return keras.ops.expand_dims(keras.ops.zeros_like(inputs, self.compute_dtype), -1) \
                + keras.ops.zeros((self.embedding_dim,), self.compute_dtype)
        shape = (*tuple(inputs.shape), self.embedding_dim)
        ids = self._ids(inputs)
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = self.client.pull_rows(self.table, unique)
        client, table = self.client, self.table

        @keras.ops.custom_gradient  # type: ignore[untyped-decorator]
        def pulled(anchor: Any) -> tuple[Any, Any]:
            def grad(*args: Any, upstream: Any = None) -> Any:
                g = args[0] if upstream is None else upstream
                client.push_rows(table, unique, _dense_numpy(g, rows.dtype))
                return keras.ops.zeros_like(anchor)

            return keras.ops.convert_to_tensor(rows), grad

        out = keras.ops.take(pulled(self.anchor.value),
                             keras.ops.convert_to_tensor(inverse.astype(np.int64)), axis=0)
        return keras.ops.cast(keras.ops.reshape(out, shape), self.compute_dtype)

    @staticmethod
    def _ids(inputs: Any) -> np.ndarray[Any, Any]:
        """The batch's ids as a flat uint64 array (negative int64 ids as their bits)."""
        try:
            ids = np.asarray(keras.ops.convert_to_numpy(inputs)).reshape(-1)
        except (NotImplementedError, TypeError, ValueError, AttributeError) as exc:
            raise RuntimeError(
                "PSEmbedding pulls rows with the batch's ids in Python: compile the model "
                "with jit_compile=False (and run_eagerly=True on the TensorFlow "
                "backend)") from exc
        if ids.dtype.kind == "f":
            if not np.array_equal(ids, np.round(ids)):
                raise ValueError("PSEmbedding ids must be integers")
            ids = ids.astype(np.int64)
        elif ids.dtype.kind not in "iu":
            raise ValueError(f"PSEmbedding ids must be integers, not {ids.dtype}")
        if ids.dtype != np.uint64:
            ids = ids.astype(np.int64).view(np.uint64)
        return ids

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(table=self.table, embedding_dim=self.embedding_dim,
                      optimizer=None if self.table_optimizer is None
                      else dict(self.table_optimizer),
                      init=list(self.init))
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], client: Client | None = None
                    ) -> PSEmbedding:
        config = {**config, "client": config.get("client", client)}
        if config["client"] is None:
            raise ValueError("PSEmbedding needs a client, which get_config leaves out: "
                             "PSEmbedding.from_config(config, client=client)")
        layer: PSEmbedding = super().from_config(config)
        return layer


def _dense_numpy(grad: Any, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """A gradient as a C-contiguous numpy array of ``dtype`` (TensorFlow hands a
    gather's gradient over as ``IndexedSlices``: made dense, repeated rows summed)."""
    if hasattr(grad, "indices") and hasattr(grad, "values"):
        import tensorflow as tf

        grad = tf.convert_to_tensor(grad)
    return np.asarray(keras.ops.convert_to_numpy(grad), dtype=dtype, order="C")


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
            save_file({k: np.asarray(v, order="C") for k, v in self.client.pull(keys).items()},
                      str(path))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.close:
            self.client.close()
