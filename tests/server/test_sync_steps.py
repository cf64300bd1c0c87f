"""Sync steps in the shard state machine and the leader's aggregator: the mean of a
step is computed and applied frame by frame, without copying the gradients, and the
bits do not depend on how the gradients were cut into frames."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from pserver.optim import OptimizerSpec
from pserver.protocol.frames import split_frames
from pserver.protocol.schema import TensorMeta, dtype_name
from pserver.protocol.shardmap import ShardMap
from pserver.shard import ShardStateMachine, aligned, mean_into, pieces

N = 3000  # elements: frames of 4 KiB cut it into pieces of 1024, 1024 and 952

OPTIMIZERS = [
    {"name": "sgd", "lr": 0.25},
    {"name": "momentum", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    {"name": "adam", "lr": 0.01},
    {"name": "adagrad", "lr": 0.1},
    {"name": "sum"},
]


def _meta(g: np.ndarray[Any, Any], nframes: int) -> TensorMeta:
    name = dtype_name(g.dtype)
    assert name is not None
    return TensorMeta("w", 0, name, (g.size,), 0, g.size, nframes)


def _cluster_of(optimizer: dict[str, Any], workers: int = 2) -> ShardStateMachine:
    sm = ShardStateMachine(0, ShardMap.uniform(1))
    init = np.linspace(-1, 1, N, dtype=np.float32)
    spec = OptimizerSpec.parse(optimizer)
    sm.apply_init([_meta(init, 1)], [[init.tobytes()]], spec, "sync", workers=workers)
    return sm


def _push(sm: ShardStateMachine, worker: int, g: np.ndarray[Any, Any],
          frame_bytes: int) -> list[memoryview]:
    frames = split_frames(g, frame_bytes)
    meta = _meta(g, len(frames))
    sm.check_push([meta])
    sm.apply_push([meta], [frames], {"worker": worker})
    return frames


def _value(sm: ShardStateMachine) -> np.ndarray[Any, Any]:
    return np.array(sm.slots[("w", 0)].value)


def _grads(rng: np.random.Generator, steps: int) -> list[tuple[np.ndarray[Any, Any], ...]]:
    return [(rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32))
            for _ in range(steps)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: str(o["name"]))
def test_the_bits_of_a_step_do_not_depend_on_the_frames(optimizer: dict[str, Any]) -> None:
    """Whole gradients, gradients in 4 KiB frames, and the two workers cutting their
    gradients differently (so the pieces do not line up) give the same bits."""
    rng = np.random.default_rng(7)
    steps = _grads(rng, 3)
    layouts = {"whole": (1 << 20, 1 << 20), "4 KiB frames": (4096, 4096),
               "unaligned": (4096, 12288)}
    values = {}
    for name, (fb0, fb1) in layouts.items():
        sm = _cluster_of(optimizer)
        for g0, g1 in steps:
            _push(sm, 0, g0, fb0)
            _push(sm, 1, g1, fb1)
        assert sm.slots[("w", 0)].sync_step == 3, name
        values[name] = _value(sm)
    for name, v in values.items():
        np.testing.assert_array_equal(v.view(np.uint32), values["whole"].view(np.uint32),
                                      err_msg=name)


def test_a_step_applies_the_mean_of_the_gradients() -> None:
    """sgd lr 0.25 over one step of two workers: value - 0.25 * (g0 + g1) / 2, bit for
    bit (float32 throughout), with the gradients in frames."""
    g0 = np.arange(N, dtype=np.float32) / 7
    g1 = np.full(N, 3, np.float32)
    sm = _cluster_of({"name": "sgd", "lr": 0.25})
    before = _value(sm)
    _push(sm, 1, g1, 4096)
    assert np.array_equal(_value(sm), before)  # waits for worker 0
    _push(sm, 0, g0, 4096)
    mean = (g0 + g1) / np.float32(2)
    np.testing.assert_array_equal(_value(sm), before - np.float32(0.25) * mean)


def test_a_waiting_gradient_is_kept_as_views_of_its_frames() -> None:
    """The gradient of a worker that waits for the others is not copied out of its
    message; a float16 gradient is widened (copied) into the parameter's dtype."""
    sm = _cluster_of({"name": "sgd", "lr": 1.0})
    frames = _push(sm, 0, np.ones(N, np.float32), 4096)
    kept = sm.slots[("w", 0)].pending[0][0]
    assert len(kept) == len(frames) == 3
    assert all(np.shares_memory(k, np.frombuffer(f, np.float32))
               for k, f in zip(kept, frames, strict=True))
    slot = sm.slots[("w", 0)]
    half = split_frames(np.ones(N, np.float16), 4096)
    widened = pieces(half, np.dtype(np.float16), slot)
    assert [p.dtype for p in widened] == [np.float32] * len(half)
    assert sum(p.size for p in widened) == N


def test_a_float16_gradient_counts_as_its_float32_value() -> None:
    sm = _cluster_of({"name": "sgd", "lr": 1.0})
    before = _value(sm)
    _push(sm, 0, np.full(N, 0.5, np.float16), 4096)
    _push(sm, 1, np.full(N, 1.5, np.float32), 4096)
    np.testing.assert_array_equal(_value(sm), before - np.float32(1.0))


def test_a_step_of_received_frames_and_a_widened_float16_gradient_applies() -> None:
    """Frames as a socket delivers them (read-only bytes) from one worker and a
    float16 gradient (widened into a writeable copy) from the other: the step
    applies their mean (it used to fail in the kernel and leave the key stuck)."""
    sm = _cluster_of({"name": "sgd", "lr": 1.0})
    before = _value(sm)
    for worker, g in ((0, np.full(N, 0.5, np.float16)), (1, np.full(N, 1.5, np.float32))):
        # frames of 1024 elements each, so the step goes piece by piece (not joined)
        frames = [bytes(f) for f in split_frames(g, 1024 * g.itemsize)]
        meta = _meta(g, len(frames))
        sm.check_push([meta])
        sm.apply_push([meta], [frames], {"worker": worker})
    np.testing.assert_array_equal(_value(sm), before - np.float32(1.0))


def test_the_leaders_mean_equals_the_whole_array_mean_for_any_cut() -> None:
    rng = np.random.default_rng(3)
    g = [rng.standard_normal(N).astype(np.float32) for _ in range(3)]
    want = ((g[0] + g[1]) + g[2]) / np.float32(3)
    for cuts in ((N,), (1000, 1000, 1000), (1024, 1024, 952)):
        bounds = np.cumsum((0, *cuts))
        grads = {w: [a[s:e] for s, e in itertools.pairwise(bounds)]
                 for w, a in enumerate(g)}
        assert len(aligned(grads, np.dtype(np.float32))) == len(cuts)
        out = np.empty(N, np.float32)
        mean_into(grads, out)
        np.testing.assert_array_equal(out, want)
    mixed = {0: [g[0][:1500], g[0][1500:]], 1: [g[1]], 2: [g[2][:10], g[2][10:]]}
    assert len(aligned(mixed, np.dtype(np.float32))) == 1
    out = np.empty(N, np.float32)
    mean_into(mixed, out)
    np.testing.assert_array_equal(out, want)


_ON_DEVICE = """
import json, sys
import numpy as np
from numba import config
from pserver.optim import OptimizerSpec
from pserver.protocol.frames import split_frames
from pserver.protocol.schema import TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.shard import ShardStateMachine
out = {"simulated": bool(config.ENABLE_CUDASIM)}
for opt in ({"name": "sum"}, {"name": "adam", "lr": 0.01}):
    values = []
    for device in ("cpu", "cuda"):
        sm = ShardStateMachine(0, ShardMap.uniform(1), device=device)
        init = np.linspace(-1, 1, 700, dtype=np.float32)
        sm.apply_init([TensorMeta("w", 0, "float32", (700,), 0, 700, 1)], [[init.tobytes()]],
                      OptimizerSpec.parse(opt), "sync", workers=2)
        rng = np.random.default_rng(1)
        for step in range(2):
            for worker in (0, 1):
                frames = split_frames(rng.standard_normal(700).astype(np.float32), 1024)
                meta = TensorMeta("w", 0, "float32", (700,), 0, 700, len(frames))
                sm.check_push([meta])
                sm.apply_push([meta], [frames], {"worker": worker})
        v = sm.slots[("w", 0)].value
        values.append(np.array(v.copy_to_host() if device == "cuda" else v))
    out[opt["name"]] = bool(np.array_equal(values[0].view(np.uint32), values[1].view(np.uint32)))
json.dump(out, sys.stdout)
"""


def test_a_cuda_shard_applies_a_step_piece_by_piece_with_the_cpu_bits() -> None:
    """On a GPU shard (numba's CUDA simulator here) the stretches of a step go to
    slices of the device arrays; ``sum`` assigns them, adam updates them, with the
    CPU's bits (gradients in 3 frames of 1 KiB)."""
    env = {k: v for k, v in os.environ.items() if k != "PSERVER_KERNELS"}
    proc = subprocess.run([sys.executable, "-c", _ON_DEVICE], capture_output=True, text=True,
                          check=False, env={**env, "NUMBA_ENABLE_CUDASIM": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"simulated": True, "sum": True, "adam": True}
