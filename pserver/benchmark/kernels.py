"""Kernel benchmarks: the update kernels against the memory limit, in one run.

Owns what ``pserver bench`` (and ``bench/test_kernels.py``) measures of
``pserver.kernels``, on its public API only:

- ``kernel_cases``: on float32 arrays of ``array_bytes`` (64 MiB) each, numpy
  ``a += b`` (**the memory limit**), ``accumulate``, ``aggregate`` of 4
  gradients (fused ``cpu`` backend and the ``numpy`` reference), ``adam``
  (``cpu``, the ``numpy`` reference, and ``torch._fused_adam_`` when torch is
  importable), ``sgd`` and ``adagrad``; each with the bytes it is counted for.
- ``measure_kernels``: every case timed round-robin, one call per case per
  round (the order reversed every other round), so the noise of this machine
  hits all of them alike; best and median GB/s, and each case's best GB/s over
  the best ``a += b`` GB/s of the same run.
- ``measure_row_index``: ``RowIndex.lookup_or_insert`` of 1M random uint64 ids
  against a Python dict loop, interleaved round by round: into an empty index
  (``fresh``, growth included), of ids already present (``existing``), and,
  for information, into an index presized for them (``presized``).
- ``kernel_report`` / ``kernel_targets`` / ``format_kernels``: the JSON section
  ``kernels`` of the report, issue 3's targets with met/missed, the text table.

Bytes counted per call, N = bytes of one array ("what the operation must move
at least"): ``a += b`` and ``accumulate`` 3N (read a, b; write a); ``aggregate``
of W gradients (W + 1)N (read W, write the output once); ``adam`` 7N (read p,
g, m, v; write p, m, v); ``sgd`` 3N (read p, g; write p); ``adagrad`` 5N (read
p, g, s; write p, s). A kernel that makes several passes touches more than it
is counted for; that shows as a lower ratio, which is the point of the target.
GB/s = 1e9 bytes/s.
"""

from __future__ import annotations

import gc
import importlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pserver import kernels

Array = np.ndarray[Any, Any]
Progress = Callable[[str], None]

MiB = 1 << 20
GB = 1e9
ARRAY_BYTES = 64 * MiB
AGGREGATE_GRADS = 4
ROW_INDEX_IDS = 1_000_000
# fresh: into an empty default-sized index (its growth included), against a dict loop
# into an empty dict; existing: the same ids again, all present; presized: fresh into
# an index created with capacity_hint = len(ids) (no growth), against the same fresh
# dict loop (information only: issue 3's target is for fresh and existing).
ROW_INDEX_SCENARIOS = ("fresh", "existing", "presized")
TARGETED_ROW_INDEX_SCENARIOS = ("fresh", "existing")
SEED = 20261127

# Issue 3 "Measure".
TARGET_AGGREGATE_RATIO = 0.8  # aggregate GB/s / a += b GB/s (best of the same run)
TARGET_ADAM_RATIO = 0.8  # fused adam GB/s / a += b GB/s
TARGET_ADAM_VS_NUMPY = 5.0  # fused adam speed / numpy reference speed
TARGET_ADAM_VS_TORCH = 1.0  # fused adam speed / torch._fused_adam_ speed ("no slower")
TARGET_ROW_INDEX_SPEEDUP = 20.0  # dict loop seconds / RowIndex seconds

# The Adam hyperparameters of every adam case (torch.optim's defaults, lr 1e-3).
ADAM_LR = 1e-3
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class KernelSettings:
    """What one kernel benchmark run measures."""

    array_bytes: int = ARRAY_BYTES
    repeats: int = 9  # timed rounds of every kernel case (one call each)
    row_ids: int = ROW_INDEX_IDS
    index_repeats: int = 7  # timed rounds of the row index scenarios
    dict_repeats: int = 5  # ... of which the dict loop runs this many
    torch: bool = True  # include torch._fused_adam_ when torch imports
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> KernelSettings:
        """Fewer rounds, for ``pserver bench --quick``."""
        base: dict[str, Any] = {"repeats": 3, "index_repeats": 3, "dict_repeats": 2,
                                "quick": True}
        base.update(overrides)
        return cls(**base)

    def steps(self) -> int:
        """Progress steps of ``kernel_report``: one per round, plus setup."""
        return 1 + (self.repeats + 1) + max(self.index_repeats, self.dict_repeats)


# -- kernel cases --------------------------------------------------------------------


@dataclass
class KernelCase:
    """One timed operation: ``run()`` does one call; ``factor`` arrays of N bytes
    are counted per call (``counted`` says which)."""

    name: str
    op: str
    backend: str
    factor: int
    counted: str
    run: Callable[[], Any]


@dataclass
class KernelCases:
    """The cases of one run, the arrays they work on, and why any were left out."""

    array_bytes: int
    cases: list[KernelCase]
    notes: list[str] = field(default_factory=list)
    torch_version: str | None = None
    torch_threads: int | None = None
    arrays: list[Any] = field(default_factory=list, repr=False)

    def case(self, name: str) -> KernelCase:
        """The case called ``name``."""
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)

    def close(self) -> None:
        """Drop the arrays (about 1 GiB at 64 MiB each)."""
        self.cases.clear()
        self.arrays.clear()
        gc.collect()


def _arrays(n: int, count: int, seed: int) -> list[Array]:
    """``count`` float32 arrays of ``n`` elements, pages faulted in: gradient-like
    values in [-0.01, 0.01), cheap to make (one random array, then scaled copies)."""
    base = np.random.default_rng(seed).random(n, dtype=np.float32)
    base -= np.float32(0.5)
    base *= np.float32(0.02)
    out = [base]
    for i in range(1, count):
        a = np.empty_like(base)
        np.multiply(base, np.float32(1.0 - 0.01 * i), out=a)
        out.append(a)
    return out


class _Step:
    """A step counter for the optimizer cases (each call is the next step)."""

    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value += 1
        return self.value


def kernel_cases(array_bytes: int = ARRAY_BYTES, *, use_torch: bool = True,
                 seed: int = SEED) -> KernelCases:
    """Every kernel case on its own float32 arrays of ``array_bytes`` each.

    Cases (``name``): ``numpy a += b`` (the limit), ``accumulate cpu``,
    ``aggregate4 cpu``, ``aggregate4 numpy``, ``adam cpu``, ``adam numpy``,
    ``adam torch`` (only when torch imports and ``use_torch``), ``sgd cpu``,
    ``adagrad cpu``. Optimizer cases keep their own parameter and state arrays,
    starting from zero state, and count steps from 1."""
    n = max(1, array_bytes // 4)
    nbytes = n * 4
    # a, b | acc p | 4 grads + out | adam p, m, v (x3 backends) | sgd p | adagrad p, s
    pool = _arrays(n, 2 + 1 + AGGREGATE_GRADS + 1 + 3 * 3 + 1 + 2, seed)
    take = iter(pool)
    a, b = next(take), next(take)
    acc = next(take)
    grads = [next(take) for _ in range(AGGREGATE_GRADS)]
    out = next(take)
    g = grads[0]
    cases: list[KernelCase] = []
    result = KernelCases(nbytes, cases, arrays=pool)

    def add() -> None:
        np.add(a, b, out=a)

    cases.append(KernelCase("numpy a += b", "bandwidth", "numpy", 3, "3N: read a, b; write a",
                            add))
    cases.append(KernelCase("accumulate cpu", "accumulate", "cpu", 3,
                            "3N: read p, g; write p",
                            lambda: kernels.accumulate(acc, g, backend="cpu")))
    agg_counted = f"{AGGREGATE_GRADS + 1}N: read {AGGREGATE_GRADS} grads; write out"
    for backend in ("cpu", "numpy"):

        def aggregate_call(backend: str = backend) -> None:
            kernels.aggregate(grads, out, backend=backend)

        cases.append(KernelCase(f"aggregate{AGGREGATE_GRADS} {backend}", "aggregate", backend,
                                AGGREGATE_GRADS + 1, agg_counted, aggregate_call))
    adam_counted = "7N: read p, g, m, v; write p, m, v"
    beta1, beta2 = ADAM_BETAS
    for backend in ("cpu", "numpy"):
        p, m, v = next(take), next(take), next(take)
        m.fill(0)
        v.fill(0)
        step = _Step()

        def adam_call(p: Array = p, m: Array = m, v: Array = v, step: _Step = step,
                      backend: str = backend) -> None:
            kernels.adam(p, g, m, v, step=step.next(), lr=ADAM_LR, beta1=beta1, beta2=beta2,
                         eps=ADAM_EPS, backend=backend)

        cases.append(KernelCase(f"adam {backend}", "adam", backend, 7, adam_counted,
                                adam_call))
    tp, tm, tv = next(take), next(take), next(take)
    if use_torch:
        torch_case = _torch_adam(tp, g, tm, tv, result)
        if torch_case is not None:
            cases.append(KernelCase("adam torch", "adam", "torch", 7, adam_counted, torch_case))
    else:
        result.notes.append("torch._fused_adam_ not measured (disabled)")
    sp = next(take)
    cases.append(KernelCase("sgd cpu", "sgd", "cpu", 3, "3N: read p, g; write p",
                            lambda: kernels.sgd(sp, g, lr=0.01, backend="cpu")))
    ap, asum = next(take), next(take)
    asum.fill(0)
    ada_step = _Step()
    cases.append(KernelCase("adagrad cpu", "adagrad", "cpu", 5, "5N: read p, g, s; write p, s",
                            lambda: kernels.adagrad(ap, g, asum, step=ada_step.next(), lr=0.01,
                                                    backend="cpu")))
    return result


def _torch_adam(p: Array, g: Array, m: Array, v: Array,
                result: KernelCases) -> Callable[[], None] | None:
    """A call of ``torch._fused_adam_`` on tensors sharing the given arrays (the
    step tensor incremented first, as ``torch.optim.Adam(fused=True)`` does), or
    None with a note when torch is missing or has no CPU fused Adam."""
    try:
        torch: Any = importlib.import_module("torch")
    except ImportError:
        result.notes.append("torch is not installed: adam vs torch._fused_adam_ not measured")
        return None
    fused = getattr(torch, "_fused_adam_", None)
    if fused is None:
        result.notes.append(f"torch {torch.__version__} has no torch._fused_adam_")
        return None
    m.fill(0)
    v.fill(0)
    params, grads = [torch.from_numpy(p)], [torch.from_numpy(g)]
    exp_avgs, exp_avg_sqs = [torch.from_numpy(m)], [torch.from_numpy(v)]
    steps = [torch.zeros((), dtype=torch.float32)]
    beta1, beta2 = ADAM_BETAS

    def call() -> None:
        steps[0] += 1
        fused(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=ADAM_LR, beta1=beta1,
              beta2=beta2, weight_decay=0.0, eps=ADAM_EPS, amsgrad=False, maximize=False)

    try:
        call()
        m.fill(0)
        v.fill(0)
        steps[0].zero_()
    except (RuntimeError, TypeError) as exc:  # e.g. no CPU kernel in an old torch
        result.notes.append(f"torch._fused_adam_ failed on CPU ({torch.__version__}): {exc}")
        return None
    result.torch_version = str(torch.__version__)
    result.torch_threads = int(torch.get_num_threads())
    return call


# -- timing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelRow:
    """One kernel case: GB/s count ``factor`` x ``array_bytes`` per call."""

    name: str
    op: str
    backend: str
    counted: str
    bytes_per_call: int
    best_ms: float
    median_ms: float
    best_gbps: float
    median_gbps: float
    vs_bandwidth: float  # best GB/s / best numpy a += b GB/s of this run
    vs_bandwidth_median: float
    repeats: int


def time_cases(cases: Sequence[KernelCase], repeats: int,
               progress: Progress | None = None) -> dict[str, list[float]]:
    """Seconds of one call of every case, ``repeats`` rounds after one warm-up
    round (compiles, faults pages in); each round calls every case once, the
    order reversed every other round."""
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    clock = time.perf_counter
    for r in range(repeats + 1):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for c in order:
            t0 = clock()
            c.run()
            dt = clock() - t0
            if r:
                times[c.name].append(dt)
        if progress is not None:
            progress("kernels" if r else "kernels warm-up")
    return times


def kernel_rows(cases: Sequence[KernelCase], times: dict[str, list[float]],
                array_bytes: int) -> list[KernelRow]:
    """The rows of ``time_cases``'s times; ratios against the ``bandwidth`` case."""
    gbps = {c.name: [c.factor * array_bytes / t / GB for t in times[c.name]] for c in cases}
    limit = next((c.name for c in cases if c.op == "bandwidth"), None)
    bw_best = max(gbps[limit]) if limit else float("nan")
    bw_median = statistics.median(gbps[limit]) if limit else float("nan")
    rows = []
    for c in cases:
        g = gbps[c.name]
        rows.append(KernelRow(
            name=c.name, op=c.op, backend=c.backend, counted=c.counted,
            bytes_per_call=c.factor * array_bytes,
            best_ms=min(times[c.name]) * 1e3, median_ms=statistics.median(times[c.name]) * 1e3,
            best_gbps=max(g), median_gbps=statistics.median(g),
            vs_bandwidth=max(g) / bw_best, vs_bandwidth_median=statistics.median(g) / bw_median,
            repeats=len(g)))
    return rows


def measure_kernels(settings: KernelSettings,
                    progress: Progress | None = None) -> tuple[list[KernelRow], KernelCases]:
    """Build the cases, time them, drop the arrays; (rows, cases without arrays)."""
    cases = kernel_cases(settings.array_bytes, use_torch=settings.torch)
    if progress is not None:
        progress("kernel arrays")
    try:
        times = time_cases(cases.cases, settings.repeats, progress)
        rows = kernel_rows(cases.cases, times, cases.array_bytes)
    finally:
        cases.close()
    return rows, cases


# -- row index ----------------------------------------------------------------------------


def random_ids(n: int, seed: int = SEED) -> Array:
    """``n`` random uint64 row ids (distinct with overwhelming probability)."""
    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


def dict_lookup_or_insert(table: dict[int, int], ids: Array) -> Array:
    """The baseline: one dict operation per id, new ids numbered in first-appearance
    order (a list comprehension over ``tolist()``, the fastest plain-Python form)."""
    setdefault = table.setdefault
    return np.array([setdefault(i, len(table)) for i in ids.tolist()], dtype=np.int64)


@dataclass(frozen=True)
class RowIndexRow:
    """Batch lookup-or-insert of ``ids`` random uint64 ids, index against dict."""

    scenario: str  # one of ROW_INDEX_SCENARIOS
    ids: int
    index_best_ms: float
    index_median_ms: float
    index_ns_per_id: float
    dict_best_ms: float
    dict_median_ms: float
    speedup: float  # best dict seconds / best index seconds
    speedup_median: float
    index_repeats: int
    dict_repeats: int


def measure_row_index(settings: KernelSettings,
                      progress: Progress | None = None) -> list[RowIndexRow]:
    """``RowIndex.lookup_or_insert`` (outputs preallocated, default-sized index)
    against ``dict_lookup_or_insert``, interleaved round by round (the order
    alternating): each round inserts the ids into an empty table (``fresh``), then
    looks the same ids up in that now full table (``existing``). The dict runs in
    the first ``dict_repeats`` rounds only (it is ~30x slower)."""
    ids = random_ids(settings.row_ids)
    n = ids.size
    out = np.empty(n, dtype=np.int64)
    created = np.empty(n, dtype=np.int64)
    times: dict[tuple[str, str], list[float]] = {
        (k, s): [] for k in ("index", "dict") for s in ROW_INDEX_SCENARIOS}
    clock = time.perf_counter

    def index_round() -> None:
        table = kernels.new_row_index()
        t0 = clock()
        table.lookup_or_insert(ids, out, created)
        t1 = clock()
        table.lookup_or_insert(ids, out, created)
        t2 = clock()
        times[("index", "fresh")].append(t1 - t0)
        times[("index", "existing")].append(t2 - t1)
        del table
        sized = kernels.new_row_index(n)
        t0 = clock()
        sized.lookup_or_insert(ids, out, created)
        times[("index", "presized")].append(clock() - t0)

    def dict_round() -> None:
        table: dict[int, int] = {}
        t0 = clock()
        dict_lookup_or_insert(table, ids)
        t1 = clock()
        dict_lookup_or_insert(table, ids)
        t2 = clock()
        times[("dict", "fresh")].append(t1 - t0)
        times[("dict", "existing")].append(t2 - t1)
        times[("dict", "presized")].append(t1 - t0)  # a dict cannot be presized

    index_round()  # warm-up: first use of the module, the output pages
    for r in range(max(settings.index_repeats, settings.dict_repeats)):
        todo = []
        if r < settings.index_repeats:
            todo.append(index_round)
        if r < settings.dict_repeats:
            todo.append(dict_round)
        for fn in todo if r % 2 == 0 else reversed(todo):
            fn()
            gc.collect()  # free the table now, not inside the next timed call
        if progress is not None:
            progress("row index")
    for k in ROW_INDEX_SCENARIOS:
        del times[("index", k)][0]  # the warm-up
    rows = []
    for scenario in ROW_INDEX_SCENARIOS:
        ix, dc = times[("index", scenario)], times[("dict", scenario)]
        rows.append(RowIndexRow(
            scenario=scenario, ids=n,
            index_best_ms=min(ix) * 1e3, index_median_ms=statistics.median(ix) * 1e3,
            index_ns_per_id=min(ix) / n * 1e9,
            dict_best_ms=min(dc) * 1e3, dict_median_ms=statistics.median(dc) * 1e3,
            speedup=min(dc) / min(ix), speedup_median=statistics.median(dc) / statistics.median(ix),
            index_repeats=len(ix), dict_repeats=len(dc)))
    return rows


# -- report ---------------------------------------------------------------------------------


def _numba_threads() -> int | None:
    try:
        import numba

        return int(numba.get_num_threads())
    except (ImportError, RuntimeError):
        return None


def kernel_report(settings: KernelSettings, progress: Progress | None = None) -> dict[str, Any]:
    """Both kernel measurements as the JSON-ready ``kernels`` section of the report
    (its ``targets`` are also meant for the report's top-level list)."""
    started = time.monotonic()
    rows, cases = measure_kernels(settings, progress)
    index_rows = measure_row_index(settings, progress)
    bw = next(r for r in rows if r.op == "bandwidth")
    section: dict[str, Any] = {
        "settings": asdict(settings),
        "array_bytes": cases.array_bytes,
        "dtype": "float32",
        "aggregate_grads": AGGREGATE_GRADS,
        "bandwidth_gbps": bw.best_gbps,
        "bandwidth_median_gbps": bw.median_gbps,
        "numba_threads": _numba_threads(),
        "numpy_threads": 1,
        "torch": cases.torch_version,
        "torch_threads": cases.torch_threads,
        "pserver_kernels_env": os.environ.get("PSERVER_KERNELS"),
        "units": "GB/s = 1e9 bytes/s counting `counted` per call; vs_bandwidth = best GB/s "
                 "/ best numpy a += b GB/s of this run; speedup = best dict s / best index s",
        "rows": [asdict(r) for r in rows],
        "row_index": [asdict(r) for r in index_rows],
        "notes": list(cases.notes),
        "duration_s": round(time.monotonic() - started, 2),
    }
    section["targets"] = kernel_targets(section)
    return section


def _row(section: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in section["rows"] if r["name"] == name), None)


def kernel_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 3's kernel targets with the values of ``section`` (a ``kernel_report``)."""
    out: list[dict[str, Any]] = []

    def target(name: str, value: float, goal: float, relation: str = ">=") -> None:
        out.append({"name": name, "value": value, "target": f"{relation} {goal:g}",
                    "met": value >= goal})

    agg = _row(section, f"aggregate{AGGREGATE_GRADS} cpu")
    if agg:
        target(f"kernels aggregate of {AGGREGATE_GRADS} (cpu) / numpy a += b bandwidth",
               agg["vs_bandwidth"], TARGET_AGGREGATE_RATIO)
    adam_cpu, adam_np, adam_torch = (_row(section, f"adam {b}") for b in ("cpu", "numpy", "torch"))
    if adam_cpu:
        target("kernels fused adam (cpu) / numpy a += b bandwidth", adam_cpu["vs_bandwidth"],
               TARGET_ADAM_RATIO)
    if adam_cpu and adam_np:
        target("kernels fused adam (cpu) speed / numpy reference adam",
               adam_np["best_ms"] / adam_cpu["best_ms"], TARGET_ADAM_VS_NUMPY)
    if adam_cpu and adam_torch:
        target("kernels fused adam (cpu) speed / torch._fused_adam_",
               adam_torch["best_ms"] / adam_cpu["best_ms"], TARGET_ADAM_VS_TORCH)
    for r in section["row_index"]:
        if r["scenario"] not in TARGETED_ROW_INDEX_SCENARIOS:
            continue
        target(f"row index lookup_or_insert {_count(r['ids'])} random ids ({r['scenario']}) "
               "speedup vs dict loop", r["speedup"], TARGET_ROW_INDEX_SPEEDUP)
    return out


def _count(n: int) -> str:
    """``1000000`` -> ``1M``, ``100000`` -> ``100k``."""
    for unit, scale in (("M", 1_000_000), ("k", 1000)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_kernels(section: dict[str, Any]) -> str:
    """The ``kernels`` section as readable text."""
    mib = section["array_bytes"] // MiB
    torch_note = (f"torch {section['torch']} ({section['torch_threads']} threads)"
                  if section["torch"] else "no torch")
    lines = [
        f"Kernels on {mib} MiB float32 arrays: best and median of "
        f"{section['settings']['repeats']} round-robin rounds; numba "
        f"{section['numba_threads']} threads, numpy 1 thread, {torch_note}",
        f"{'kernel':>18} {'counted':>36} | {'best ms':>8} {'median':>8} | "
        f"{'best GB/s':>9} {'median':>7} | {'/ a+=b':>6}",
    ]
    for r in section["rows"]:
        lines.append(
            f"{r['name']:>18} {r['counted']:>36} | {r['best_ms']:>8.2f} {r['median_ms']:>8.2f} | "
            f"{r['best_gbps']:>9.1f} {r['median_gbps']:>7.1f} | {r['vs_bandwidth']:>6.2f}")
    lines += [
        "",
        "Row index: batch lookup_or_insert of random uint64 ids vs a Python dict loop",
        f"{'scenario':>9} {'ids':>8} | {'index best ms':>13} {'median':>7} {'ns/id':>6} | "
        f"{'dict best ms':>12} {'median':>7} | {'speedup':>7}",
    ]
    for r in section["row_index"]:
        lines.append(
            f"{r['scenario']:>9} {r['ids']:>8} | {r['index_best_ms']:>13.1f} "
            f"{r['index_median_ms']:>7.1f} {r['index_ns_per_id']:>6.1f} | "
            f"{r['dict_best_ms']:>12.1f} {r['dict_median_ms']:>7.1f} | {r['speedup']:>6.1f}x")
    return "\n".join(lines)
