"""Keras checks that run the same on every backend, against a running cluster.

``test_keras.py`` calls them in its own process (torch backend);
``test_keras_tensorflow.py`` runs this file as a script in a child process with
``KERAS_BACKEND=tensorflow`` (a process's backend is fixed once keras is imported):
``python keras_cases.py CASE ADDRESS [TMPDIR]`` runs one case, prints its result
as one ``RESULT {json}`` line and exits 0, or fails with the assertion's traceback.

Every case asserts its own thresholds, so a failure names the check on either
backend. The models compile as the shim documents: ``jit_compile=False``, and
``run_eagerly=True`` on TensorFlow only.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.datasets import load_digits

import pserver
from pserver.keras import PSEmbedding, PServerCallback, PSOptimizer

COMPILE: dict[str, Any] = {"jit_compile": False,
                           "run_eagerly": keras.backend.backend() == "tensorflow"}
# 5 digit-classifier epochs of 64 on 80 % of scikit-learn's 1,797 digits
DIGITS_STEPS = 5 * -(-int(0.8 * 1797) // 64)


def set_random_seed(seed: int) -> None:
    """``keras.utils.set_random_seed``, but on torch without it: it imports TensorFlow
    whenever that is installed, and the torch-backend process is pytest's own, which
    should not carry TensorFlow beside torch and numba. Python's seed also fixes
    keras' unseeded initializers; torch's the order ``fit`` shuffles in."""
    if keras.backend.backend() != "torch":
        keras.utils.set_random_seed(seed)
        return
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit_digits(address: str, tmp: Path) -> dict[str, Any]:
    """``model.fit`` with ``PSOptimizer`` (server-side momentum) on scikit-learn's
    digits: at least 90 % test accuracy; the callback's checkpoint holds the values
    the model ends with."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order]
    cut = int(0.8 * len(x))
    set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    with pserver.connect(address) as client:
        model.compile(optimizer=PSOptimizer(client, {"name": "momentum", "lr": 0.1,
                                                     "momentum": 0.9}),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], **COMPILE)
        ckpt = str(tmp / "epoch-{epoch}.safetensors")
        history = model.fit(x[:cut], y[:cut], batch_size=64, epochs=5, verbose=0,
                            callbacks=[PServerCallback(client, checkpoint=ckpt)])
        _, acc = model.evaluate(x[cut:], y[cut:], verbose=0)
    assert acc >= 0.9, f"test accuracy {acc:.3f}"
    assert history.history["pserver_steps"][-1] == DIGITS_STEPS
    saved = load_file(tmp / "epoch-5.safetensors")
    assert sorted(saved) == sorted(v.path for v in model.trainable_variables)
    for v in model.trainable_variables:
        np.testing.assert_array_equal(saved[v.path].reshape(tuple(v.shape)),
                                      keras.ops.convert_to_numpy(v.value))
    return {"accuracy": float(acc), "steps": int(history.history["pserver_steps"][-1])}


def embedding_rows(address: str, tmp: Path) -> dict[str, Any]:
    """``PSEmbedding`` semantics in ``model.fit``: the batch's rows are pulled, their
    gradients pushed once per unique id (repeats summed), the anchor stays zero and
    is not a server key, with an ordinary Keras optimizer and with ``PSOptimizer``;
    workers share the table; ``get_config`` rebuilds the layer."""
    del tmp
    ids = np.array([[3, 9], [3, 2**40]], np.int64)

    def model_on(emb: PSEmbedding) -> keras.Model:
        inp = keras.Input((2,), dtype="int64")
        h = emb(inp)
        assert tuple(h.shape) == (None, 2, 4)
        dense = keras.layers.Dense(1, kernel_initializer="ones", name="head")
        return keras.Model(inp, dense(keras.layers.Flatten()(h)))

    def total(_: Any, pred: Any) -> Any:  # d loss / d row = 1 per use, with a ones head
        return keras.ops.sum(pred)

    # c0 trains (one worker: PSOptimizer's start barrier is its own); c1 is a second
    # worker that only creates the table again and reads rows
    with pserver.connect(address) as c0, \
            pserver.connect(address, worker_id=1, num_workers=2) as c1:
        sgd = {"name": "sgd", "lr": 0.5}
        emb = PSEmbedding(c0, "items", 4, optimizer=sgd, init=("zeros",))
        PSEmbedding(c1, "items", 4, optimizer=sgd, init=("zeros",))  # the same table again
        with pytest.raises(pserver.ShapeMismatch):
            PSEmbedding(c1, "items", 5)  # another width for the same table
        # called directly: the rows of every id in place, repeats and all
        many = np.array([[7, 2**63 + 5, 7], [0, 2**40, 2**63 + 5]], np.uint64)
        normal = PSEmbedding(c0, "normal", 3, init=("normal", 1.0))
        got = keras.ops.convert_to_numpy(normal(keras.ops.convert_to_tensor(
            many.view(np.int64))))
        want = c1.pull_rows("normal", many.reshape(-1)).reshape(2, 3, 3)
        assert np.abs(want).min() > 0
        np.testing.assert_array_equal(got, want)

        model = model_on(emb)
        # an ordinary Keras optimizer for the dense head (lr 0: it stays ones)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss=total, **COMPILE)
        model.fit(ids, np.zeros(2, np.float32), batch_size=2, verbose=0, shuffle=False)
        rows = c1.pull_rows("items", np.array([3, 9, 2**40, 5], np.uint64))
        np.testing.assert_array_equal(rows[:, 0], [-1.0, -0.5, -0.5, 0.0])
        assert float(keras.ops.convert_to_numpy(emb.anchor.value)) == 0.0
        pred = model.predict(ids, verbose=0)
        np.testing.assert_array_equal(pred[:, 0], [-6.0, -6.0])

        # PSOptimizer: the head is a server key, the anchor is not; rows as before
        emb2 = PSEmbedding.from_config(emb.get_config() | {"table": "items2"}, client=c0)
        assert emb2.get_config() == emb.get_config() | {"table": "items2",
                                                        "name": emb2.name}
        json.dumps(emb2.get_config())
        model2 = model_on(emb2)
        model2.compile(optimizer=PSOptimizer(c0, {"name": "sgd", "lr": 0.0}), loss=total,
                       **COMPILE)
        model2.fit(ids, np.zeros(2, np.float32), batch_size=2, verbose=0, shuffle=False)
        rows = c0.pull_rows("items2", np.array([3, 9, 2**40, 5], np.uint64))
        np.testing.assert_array_equal(rows[:, 0], [-1.0, -0.5, -0.5, 0.0])
        keys = set(c0.keys())
        assert keys == {v.path for v in model2.trainable_variables if "anchor" not in v.path}
        assert keys and not any("anchor" in k for k in keys)
        if keras.backend.backend() == "tensorflow":
            # a traced (graph mode) step cannot pull rows: a clear error, not wrong rows
            model.compile(optimizer=keras.optimizers.SGD(0.0), loss=total, jit_compile=False)
            with pytest.raises(RuntimeError, match="run_eagerly=True"):
                model.fit(ids, np.zeros(2, np.float32), batch_size=2, verbose=0)
    return {"rows": rows[:, 0].tolist(), "keys": sorted(keys)}


def _movielens() -> tuple[np.ndarray, np.ndarray]:
    """MovieLens-100K from recbole's wheel (a file, never downloaded): (user, item,
    rating) rows, shuffled, cut 80/20."""
    spec = importlib.util.find_spec("recbole")
    assert spec is not None and spec.submodule_search_locations
    path = f"{spec.submodule_search_locations[0]}/dataset_example/ml-100k/ml-100k.inter"
    raw = np.loadtxt(path, skiprows=1, usecols=(0, 1, 2), dtype=np.int64)
    raw = raw[np.random.default_rng(0).permutation(len(raw))]
    cut = int(0.8 * len(raw))
    return raw[:cut], raw[cut:]


def movielens(address: str, tmp: Path, dense_optimizer: str = "pserver") -> dict[str, Any]:
    """Matrix factorisation on MovieLens-100K through ``model.fit``: user and item
    embeddings and biases in server tables (Adagrad on the server), a small dense
    head mixing them (``dense_optimizer``: ``pserver`` for ``PSOptimizer``, ``keras``
    for Keras' own Adam). Test RMSE at most 0.95 after 3 epochs (the global mean
    scores 1.13)."""
    del tmp
    train, test = _movielens()
    mu = float(train[:, 2].mean())
    baseline = float(np.sqrt(((test[:, 2] - mu) ** 2).mean()))
    set_random_seed(0)
    with pserver.connect(address, timeout=60) as client:
        opt = {"name": "adagrad", "lr": 0.1, "weight_decay": 0.2}
        user, item = keras.Input((), dtype="int64"), keras.Input((), dtype="int64")
        pu = PSEmbedding(client, "users", 16, optimizer=opt, init=("normal", 0.1))(user)
        qi = PSEmbedding(client, "items", 16, optimizer=opt, init=("normal", 0.1))(item)
        bu = PSEmbedding(client, "user_bias", 1, optimizer=opt, init=("zeros",))(user)
        bi = PSEmbedding(client, "item_bias", 1, optimizer=opt, init=("zeros",))(item)
        dot = keras.ops.sum(pu * qi, axis=-1, keepdims=True)
        head = keras.layers.Dense(1, kernel_initializer="ones",
                                  bias_initializer=keras.initializers.Constant(mu))
        # (batch, 1) against (batch, 1) targets: a summed loss sums the squared errors
        model = keras.Model([user, item], head(keras.ops.concatenate([dot, bu, bi], -1)))
        optimizer = (PSOptimizer(client, {"name": "adagrad", "lr": 0.01})
                     if dense_optimizer == "pserver" else keras.optimizers.Adam(1e-3))
        model.compile(optimizer=optimizer, loss=keras.losses.MeanSquaredError(reduction="sum"),
                      **COMPILE)
        model.fit([train[:, 0], train[:, 1]], train[:, 2:3].astype(np.float32),
                  batch_size=1024, epochs=3, verbose=0)
        pred = model.predict([test[:, 0], test[:, 1]], batch_size=4096, verbose=0)[:, 0]
        rmse = float(np.sqrt(((pred - test[:, 2]) ** 2).mean()))
        keys = sorted(client.keys())
    assert baseline > 1.1
    assert rmse <= 0.95, f"test RMSE {rmse:.4f} (global mean {baseline:.4f})"
    # the head is a server key with PSOptimizer and none with Keras' Adam; anchors never
    assert keys == (sorted(w.path for w in head.trainable_weights)
                    if dense_optimizer == "pserver" else []), keys
    return {"rmse": rmse, "baseline": baseline, "keys": keys}


CASES = {"fit_digits": fit_digits, "embedding_rows": embedding_rows, "movielens": movielens,
         "movielens_keras_adam": lambda a, t: movielens(a, t, dense_optimizer="keras")}


def main(argv: list[str]) -> None:
    case, address, tmp = argv[0], argv[1], Path(argv[2] if len(argv) > 2 else ".")
    result = CASES[case](address, tmp)
    print("RESULT " + json.dumps({"backend": keras.backend.backend(), **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
