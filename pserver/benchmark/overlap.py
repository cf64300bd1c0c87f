"""Overlap of communication with backward in the PyTorch shim (issue 5, "Measure").

Owns ``overlap_section``: a model of many layers (``Linear`` + ``ReLU``) trained
step by step through ``pserver.torch.DistributedOptimizer`` with the server's
optimizer, once with the post-accumulate-grad hooks that start each layer's
push while backward goes on (``overlap=True``, the default) and once without
(``overlap=False``: every push starts in ``step``), rounds interleaved, on two
copies of the same model. Two references from the same run bound what overlap
can reach: the compute alone (forward + backward, no server) and the
communication alone (one ``push_pull`` of every gradient). torch is imported
here only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pserver

from .scenarios import KEY_PREFIX

Progress = Callable[[str], None]


@dataclass(frozen=True)
class OverlapSettings:
    layers: int = 16
    width: int = 1024  # 16 x 1024 x 1024 float32: 64 MiB of weights
    batch: int = 64
    steps: int = 5
    rounds: int = 3

    @classmethod
    def quick_settings(cls) -> OverlapSettings:
        return cls(layers=8, width=512, steps=3, rounds=2)


def overlap_section(address: str, settings: OverlapSettings,
                    progress: Progress | None = None) -> dict[str, Any]:
    import torch

    from pserver.torch import DistributedOptimizer

    s = settings

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[m for _ in range(s.layers)
                                     for m in (torch.nn.Linear(s.width, s.width),
                                               torch.nn.ReLU())])

    x = torch.randn(s.batch, s.width)
    prefix = f"{KEY_PREFIX}/overlap-{s.layers}x{s.width}"
    with pserver.connect(address, timeout=120) as client:
        models = {flag: model() for flag in (True, False)}
        opts = {flag: DistributedOptimizer(
            None, [(f"{prefix}-{flag}/{n}", p) for n, p in m.named_parameters()],
            client=client, server_optimizer={"name": "sgd", "lr": 1e-6}, mode="async",
            overlap=flag) for flag, m in models.items()}

        def train(flag: bool) -> float:
            m, opt = models[flag], opts[flag]
            t0 = time.perf_counter()
            for _ in range(s.steps):
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
            return (time.perf_counter() - t0) / s.steps

        def compute() -> float:  # the copy without hooks: backward pushes nothing
            m = models[False]
            t0 = time.perf_counter()
            for _ in range(s.steps):
                m.zero_grad()
                m(x).square().mean().backward()
            return (time.perf_counter() - t0) / s.steps

        # one step's bytes: the parameter values stand in for gradients of the same shapes
        payload = {f"{prefix}-True/{n}": p.detach().numpy().copy()
                   for n, p in models[True].named_parameters()}

        def comm() -> float:
            t0 = time.perf_counter()
            for _ in range(s.steps):
                client.push_pull(payload)
            return (time.perf_counter() - t0) / s.steps

        times: dict[str, list[float]] = {"hooks": [], "no_hooks": [], "compute": [],
                                         "comm": []}
        train(True)  # warm-up: keys created, first applies, allocator
        train(False)
        for r in range(s.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for flag in order:
                times["hooks" if flag else "no_hooks"].append(train(flag))
            times["compute"].append(compute())
            times["comm"].append(comm())
            if progress is not None:
                progress(f"overlap round {r + 1}")
        for opt in opts.values():
            opt.remove_hooks()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "layers": s.layers, "width": s.width, "batch": s.batch, "steps": s.steps,
        "rounds": s.rounds, "model_bytes": s.layers * (s.width * s.width + s.width) * 4,
        "step_ms_hooks": med["hooks"], "step_ms_no_hooks": med["no_hooks"],
        "compute_ms": med["compute"], "comm_ms": med["comm"],
        "speedup": med["no_hooks"] / med["hooks"],
        "ideal_ms": max(med["compute"], med["comm"]),
    }


def overlap_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": f"torch step of {section['layers']} layers: no hooks / hooks",
             "value": section["speedup"], "target": "> 1", "met": section["speedup"] > 1}]
