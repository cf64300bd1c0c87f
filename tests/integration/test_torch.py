"""pserver.torch on real clusters: an MLP on scikit-learn's digits trained by two
workers in sync mode through 2 shards x 3 replicas (with and without a leader
killed mid-run) reaches the accuracy of the same model trained in one process;
the server-optimizer mode follows torch.optim; ssp and async converge; a dead
worker does not hold sync steps; PSEmbedding(Bag) trains rows on the server and
matrix factorisation on MovieLens-100K beats the global mean; DDP averages through
the server; exported and pulled state dicts restore the model."""

from __future__ import annotations

import os
import queue
import signal
import time
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import pserver
from pserver.clients.client import cluster_status
from pserver.torch import DistributedOptimizer, PSEmbedding, state_dict_from_server

from .support import run_workers

pytestmark = pytest.mark.integration

EPOCHS, BATCH, LR = 6, 64, 0.5


def digits() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.int64)
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(EPOCHS):
        order = torch.randperm(n, generator=g)
        out += [order[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
    return out


def train_single() -> float:
    xtr, ytr, xte, yte = digits()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for idx in batches(len(xtr)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    return accuracy(model, xte, yte)


def halves_reference() -> bytes:
    """What two sync workers must compute, in one process: each step the mean of the
    two half-batch gradients (float32, (g0 + g1) / 2 as the server sums in worker
    order), applied by torch's SGD. Returns the parameters' bytes."""
    xtr, ytr, _, _ = digits()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for idx in batches(len(xtr)):
        grads = []
        for rank in (0, 1):
            half = idx[rank * BATCH // 2:(rank + 1) * BATCH // 2]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[half]), ytr[half]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
        for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
            p.grad = (g0 + g1) / 2
        opt.step()
    return _bytes(model)


def _bytes(model: torch.nn.Module) -> bytes:
    return b"".join(p.detach().numpy().tobytes() for p in model.parameters())


def train_two_workers(address: str, kill_leader_at: int | None = None) -> tuple[float, bytes]:
    """Two workers (threads with their own clients), each on its half of every batch;
    the server averages their gradients, each worker's SGD applies the mean. Returns
    the accuracy and the parameters' bytes (the same on both workers)."""
    xtr, ytr, xte, yte = digits()
    plan = batches(len(xtr))
    # Built here, not in the threads: torch's seeded initialisation uses one global
    # generator, which two threads building models at once would interleave.
    models = {0: mlp(), 1: mlp()}
    with torch.no_grad():
        for p in models[1].parameters():
            p.normal_()  # worker 1 starts elsewhere: it must take worker 0's values

    def worker(rank: int) -> None:
        model = models[rank]
        with pserver.connect(address, worker_id=rank, num_workers=2, timeout=60) as c:
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                       model.named_parameters(), client=c)
            for step, idx in enumerate(plan):
                if rank == 0 and step == kill_leader_at:
                    st = cluster_status(address)["shards"][0]["replicas"]
                    os.kill(next(r for r in st if r["role"] == "leader")["pid"],
                            signal.SIGKILL)
                half = idx[rank * BATCH // 2:(rank + 1) * BATCH // 2]
                opt.zero_grad()
                # each worker's loss is the mean over its half: the mean of the two
                # gradients is the gradient of the whole batch's mean loss
                torch.nn.functional.cross_entropy(model(xtr[half]), ytr[half]).backward()
                opt.step()

    run_workers(worker, 2, 300)
    assert _bytes(models[0]) == _bytes(models[1]), "the two workers hold different models"
    return accuracy(models[0], xte, yte), _bytes(models[0])


@pytest.mark.failover
@pytest.mark.parametrize("kill", [False, True], ids=["steady", "leader-killed"])
def test_two_workers_in_sync_reach_the_single_process_accuracy(
        cluster_factory: Any, kill: bool) -> None:
    """Bit for bit what two halves averaged in one process give (a lost or repeated
    update across the leader's death would show), and within 0.01 of the accuracy of
    one process training on whole batches (whose float sums differ slightly)."""
    c = cluster_factory("--shards", "2", "--replicas", "3", "--workers", "2")
    want = halves_reference()
    got, got_bytes = train_two_workers(c.address, kill_leader_at=60 if kill else None)
    assert got_bytes == want, "the cluster's model differs from the in-process one"
    whole = train_single()
    assert whole > 0.9
    assert abs(got - whole) <= 0.01, f"two workers {got:.4f} vs one process {whole:.4f}"


def test_a_server_optimizer_follows_torch_optim(cluster_factory: Any) -> None:
    c = cluster_factory("--shards", "2")
    xtr, ytr, _, _ = digits()
    local, remote = mlp(), mlp()
    ref = torch.optim.SGD(local.parameters(), lr=LR, momentum=0.9)
    with pserver.connect(c.address) as client:
        opt = DistributedOptimizer(None, remote.named_parameters(), client=client,
                                   server_optimizer={"name": "sgd", "lr": LR,
                                                     "momentum": 0.9})
        for idx in batches(len(xtr))[:30]:
            for model, o in ((local, ref), (remote, opt)):
                o.zero_grad()
                torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                o.step()
        for (name, a), b in zip(local.named_parameters(), remote.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        assert opt.state_dict()["pserver"]["steps"] == 30
        restored = mlp()
        for p in restored.parameters():
            torch.nn.init.zeros_(p)
        shapes = {n: p.shape for n, p in restored.named_parameters()}
        restored.load_state_dict(state_dict_from_server(client, list(shapes), shapes))
        torch.testing.assert_close(restored(xtr[:50]), remote(xtr[:50]))


def _sgd_pair(client: pserver.Client, **kw: Any) -> tuple[
        torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, DistributedOptimizer]:
    """The same MLP twice: one for torch.optim's SGD, one trained through the server's."""
    local, remote = mlp(), mlp()
    ref = torch.optim.SGD(local.parameters(), lr=LR)
    opt = DistributedOptimizer(None, remote.named_parameters(), client=client,
                               server_optimizer={"name": "sgd", "lr": LR}, **kw)
    return local, remote, ref, opt


@pytest.mark.parametrize("bucket_bytes", [1, 1 << 30], ids=["per-parameter", "one-bucket"])
def test_backward_hooks_push_in_buckets_and_follow_torch_optim(cluster_factory: Any,
                                                               bucket_bytes: int) -> None:
    """A bucket of one byte starts one push per parameter during backward; a bucket
    larger than the model leaves everything to ``step``; both train the same."""
    c = cluster_factory("--shards", "2")
    xtr, ytr, _, _ = digits()
    with pserver.connect(c.address) as client:
        local, remote, ref, opt = _sgd_pair(client, bucket_bytes=bucket_bytes)
        during_backward: list[int] = []
        in_backward = False
        push_pull_async = client.push_pull_async

        def counted(grads: dict[str, Any]) -> Any:
            if in_backward:
                during_backward.append(len(grads))
            return push_pull_async(grads)

        client.push_pull_async = counted  # type: ignore[method-assign]
        for idx in batches(len(xtr))[:10]:
            for model, o in ((local, ref), (remote, opt)):
                o.zero_grad()
                in_backward = model is remote
                torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                in_backward = False
                o.step()
        n_params = len(list(remote.parameters()))
        assert during_backward == ([1] * n_params * 10 if bucket_bytes == 1 else [])
        for (name, a), b in zip(local.named_parameters(), remote.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bucket_bytes", [1, 1 << 30], ids=["per-parameter", "one-bucket"])
def test_gradients_accumulated_over_backward_passes_follow_torch_optim(
        cluster_factory: Any, bucket_bytes: int) -> None:
    """``backward_passes_per_step=2``: two backward passes per step push their sum once,
    as one torch.optim step on the accumulated gradient, even when the hooks push
    during backward (bucket of one byte). A third pass before ``step`` raises."""
    c = cluster_factory("--shards", "2")
    xtr, ytr, _, _ = digits()
    with pserver.connect(c.address) as client:
        local, remote, ref, opt = _sgd_pair(client, bucket_bytes=bucket_bytes,
                                            backward_passes_per_step=2)
        for idx in batches(len(xtr))[:8]:
            for model, o in ((local, ref), (remote, opt)):
                o.zero_grad()
                for half in (idx[:BATCH // 2], idx[BATCH // 2:]):
                    torch.nn.functional.cross_entropy(model(xtr[half]), ytr[half]).backward()
                o.step()
        for (name, a), b in zip(local.named_parameters(), remote.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        opt.zero_grad()
        for _ in range(2):
            torch.nn.functional.cross_entropy(remote(xtr[:8]), ytr[:8]).backward()
        with pytest.raises(RuntimeError, match="backward_passes_per_step=N"):
            torch.nn.functional.cross_entropy(remote(xtr[:8]), ytr[:8]).backward()


def test_a_second_backward_before_step_raises_instead_of_pushing_twice(
        cluster_factory: Any) -> None:
    """With the default of one backward pass per step, the hooks would already have
    pushed the first pass's gradient: a second pass raises, naming the setting."""
    c = cluster_factory("--shards", "1")
    xtr, ytr, _, _ = digits()
    model = mlp()
    with pserver.connect(c.address) as client:
        opt = DistributedOptimizer(None, model.named_parameters(), client=client,
                                   server_optimizer={"name": "sgd", "lr": LR}, bucket_bytes=1)
        before = client.pull(["0.weight"])["0.weight"]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[:8]), ytr[:8]).backward()
        with pytest.raises(RuntimeError, match="computed 2 times before step"):
            torch.nn.functional.cross_entropy(model(xtr[:8]), ytr[:8]).backward()
        opt.step()  # the first pass's pushes, answered
        assert not np.array_equal(client.pull(["0.weight"])["0.weight"], before)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[:8]), ytr[:8]).backward()
        opt.step()  # the next step counts passes afresh


def test_state_dict_from_server_refuses_the_gradients_of_a_local_optimizer(
        cluster_factory: Any) -> None:
    """With a local optimizer the server's keys hold the last mean gradient, not the
    weights: restoring from them would load gradients as weights silently."""
    c = cluster_factory("--shards", "1")
    xtr, ytr, _, _ = digits()
    model = mlp()
    with pserver.connect(c.address) as client:
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                   model.named_parameters(), client=client)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[:8]), ytr[:8]).backward()
        opt.step()
        with pytest.raises(ValueError, match="mean gradient"):
            state_dict_from_server(client)
        with pytest.raises(ValueError, match="mean gradient"):
            state_dict_from_server(client, ["0.weight"])


def test_ps_embedding_refuses_float_ids(cluster_factory: Any) -> None:
    c = cluster_factory("--shards", "1")
    with pserver.connect(c.address) as client:
        emb = PSEmbedding(client, "t", 2)
        with pytest.raises(TypeError, match="must be integers"):
            emb(torch.tensor([1.7, 2.2]))
        assert emb(torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 2)


def test_ps_embedding_pulls_rows_and_pushes_their_gradients(cluster_factory: Any) -> None:
    c = cluster_factory("--shards", "2")
    with pserver.connect(c.address) as client:
        emb = PSEmbedding(client, "items", 4, optimizer={"name": "sgd", "lr": 0.5},
                          init=("zeros",))
        ids = torch.tensor([[3, 9], [3, 2**40]])
        out = emb(ids)
        assert out.shape == (2, 2, 4) and torch.all(out == 0)
        out.sum().backward()  # d/d row = 1 per use; id 3 is used twice
        rows = client.pull_rows("items", np.array([3, 9, 2**40, 5], np.uint64))
        np.testing.assert_array_equal(rows[:, 0], [-1.0, -0.5, -0.5, 0.0])


def _train_server_side(address: str, mode: str, staleness: int | None = None,
                       stop_worker_1_at: int | None = None) -> float:
    """Two workers on halves of each batch, the server's SGD applying every push
    (async), within ``staleness`` steps of each other (ssp), or the mean (sync)."""
    xtr, ytr, xte, yte = digits()
    plan = batches(len(xtr))
    models = {0: mlp(), 1: mlp()}  # not in the threads: seeding uses one global generator

    def worker(rank: int) -> None:
        c = pserver.connect(address, worker_id=rank, num_workers=2, timeout=60)
        try:
            model = models[rank]
            opt = DistributedOptimizer(None, model.named_parameters(), client=c, mode=mode,
                                       staleness=staleness,
                                       server_optimizer={"name": "sgd", "lr": LR / 2})
            for step, idx in enumerate(plan):
                if rank == 1 and step == stop_worker_1_at:
                    return  # this worker dies: no more pushes, no more heartbeats
                half = idx[rank * BATCH // 2:(rank + 1) * BATCH // 2]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xtr[half]), ytr[half]).backward()
                opt.step()
        finally:
            c.close()

    run_workers(worker, 2, 300)
    return accuracy(models[0], xte, yte)


@pytest.mark.parametrize(("mode", "staleness"), [("ssp", 2), ("async", None)])
def test_ssp_and_async_training_converge_on_digits(cluster_factory: Any, mode: str,
                                                   staleness: int | None) -> None:
    c = cluster_factory("--shards", "2", "--replicas", "3")
    assert _train_server_side(c.address, mode, staleness) > 0.85


def test_a_dead_worker_does_not_stop_sync_training_past_the_worker_timeout(
        cluster_factory: Any) -> None:
    c = cluster_factory("--shards", "2", "--replicas", "3", "--workers", "2",
                        "--worker-timeout", "2")
    assert _train_server_side(c.address, "sync", stop_worker_1_at=20) > 0.85


def test_an_exported_safetensors_file_restores_the_model_in_plain_torch(
        cluster_factory: Any, tmp_path: Any) -> None:
    import subprocess
    import sys

    from safetensors.torch import load_file

    c = cluster_factory("--shards", "2")
    xtr, ytr, _, _ = digits()
    model = mlp()
    with pserver.connect(c.address) as client:
        opt = DistributedOptimizer(None, model.named_parameters(), client=client,
                                   server_optimizer={"name": "adam", "lr": 1e-2})
        for idx in batches(len(xtr))[:20]:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    out = tmp_path / "model.safetensors"
    subprocess.run([sys.executable, "-m", "pserver", "export", "--address", c.address,
                    "--format", "safetensors", str(out)], check=True, timeout=60)
    fresh = mlp()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    state = {k: v.reshape(fresh.state_dict()[k].shape) for k, v in load_file(out).items()}
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(xtr), model(xtr), rtol=0, atol=0)


def _ddp_worker(rank: int, address: str, port: int, out: Any) -> None:
    """One process of a 2-process DDP job (gloo) whose gradients the server averages."""
    import torch.distributed as dist

    from pserver.torch import register_ddp_hook

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        xtr, ytr, _, _ = digits()
        ddp = torch.nn.parallel.DistributedDataParallel(mlp())
        with pserver.connect(address, worker_id=rank, num_workers=2, timeout=60) as client:
            register_ddp_hook(ddp, client)
            opt = torch.optim.SGD(ddp.parameters(), lr=LR)
            for idx in batches(len(xtr))[:25]:
                half = idx[rank * BATCH // 2:(rank + 1) * BATCH // 2]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(xtr[half]), ytr[half]).backward()
                opt.step()
        out.put((rank, {n: p.detach().numpy().copy() for n, p in ddp.module.named_parameters()}))
    finally:
        dist.destroy_process_group()


def test_a_ddp_hook_averages_gradients_through_the_server(cluster_factory: Any) -> None:
    """Two DDP processes whose all-reduce is replaced by the server: both end with
    the model one process gets from the whole batches."""
    import multiprocessing as mp
    import socket

    c = cluster_factory("--shards", "2", "--replicas", "3", "--workers", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, c.address, port, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + 240
    while len(got) < len(procs):  # fail as soon as a worker dies, not at the deadline
        try:
            rank, params = q.get(timeout=0.5)
            got[rank] = params
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed, f"a DDP worker failed (exit codes {failed})"
            assert time.monotonic() < deadline, "the DDP workers gave no result in 240 s"
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    xtr, ytr, _, _ = digits()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for idx in batches(len(xtr))[:25]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(got[0][name], got[1][name])
        np.testing.assert_allclose(got[0][name], p.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_ps_embedding_bag_sums_or_averages_each_bag(cluster_factory: Any) -> None:
    from pserver.torch import PSEmbeddingBag

    c = cluster_factory("--shards", "2")
    with pserver.connect(c.address) as client:
        client.create_table("bags", 2, optimizer={"name": "sum"}, init=("zeros",))
        client.push_rows("bags", np.array([1, 2, 3], np.uint64),
                         np.array([[1, 1], [2, 2], [4, 4]], np.float32))  # rows 1, 2, 4
        for mode, want in (("sum", [[3, 3], [4, 4], [0, 0]]), ("mean", [[1.5, 1.5], [4, 4],
                                                                          [0, 0]])):
            bag = PSEmbeddingBag(client, "bags", 2, mode=mode, optimizer={"name": "sum"},
                                 init=("zeros",))
            out = bag(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]))
            torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float32))
        sums = PSEmbeddingBag(client, "grads", 2, mode="sum", optimizer={"name": "sgd", "lr": 1},
                              init=("zeros",))
        sums(torch.tensor([[5, 6], [5, 7]])).sum().backward()
        rows = client.pull_rows("grads", np.array([5, 6, 7], np.uint64))
        np.testing.assert_array_equal(rows[:, 0], [-2.0, -1.0, -1.0])


def test_matrix_factorisation_on_movielens_100k_beats_the_global_mean(
        cluster_factory: Any) -> None:
    """MovieLens-100K from recbole's wheel (read as a file, never downloaded): user and
    item embeddings and biases in server tables, Adagrad on the server."""
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    assert spec is not None and spec.submodule_search_locations
    path = f"{spec.submodule_search_locations[0]}/dataset_example/ml-100k/ml-100k.inter"
    raw = np.loadtxt(path, skiprows=1, usecols=(0, 1, 2), dtype=np.int64)
    rng = np.random.default_rng(0)
    raw = raw[rng.permutation(len(raw))]
    cut = int(0.8 * len(raw))
    train, test = raw[:cut], raw[cut:]
    mu = float(train[:, 2].mean())
    baseline = float(np.sqrt(((test[:, 2] - mu) ** 2).mean()))
    c = cluster_factory("--shards", "2", "--replicas", "3")
    with pserver.connect(c.address, timeout=60) as client:
        opt = {"name": "adagrad", "lr": 0.05, "weight_decay": 0.05}
        users = PSEmbedding(client, "users", 16, optimizer=opt, init=("normal", 0.1))
        items = PSEmbedding(client, "items", 16, optimizer=opt, init=("normal", 0.1))
        user_bias = PSEmbedding(client, "user_bias", 1, optimizer=opt, init=("zeros",))
        item_bias = PSEmbedding(client, "item_bias", 1, optimizer=opt, init=("zeros",))

        def predict(batch: np.ndarray) -> torch.Tensor:
            u, i = torch.tensor(batch[:, 0]), torch.tensor(batch[:, 1])
            return mu + (users(u) * items(i)).sum(1) + user_bias(u)[:, 0] + item_bias(i)[:, 0]

        for _ in range(5):
            order = rng.permutation(len(train))
            for s in range(0, len(train), 1024):
                batch = train[order[s:s + 1024]]
                target = torch.tensor(batch[:, 2], dtype=torch.float32)
                ((predict(batch) - target) ** 2).sum().backward()
        with torch.no_grad():
            target = torch.tensor(test[:, 2], dtype=torch.float32)
            rmse = float(torch.sqrt(((predict(test) - target) ** 2).mean()))
    assert baseline > 1.1
    assert rmse <= 0.95, f"test RMSE {rmse:.4f} (global mean {baseline:.4f})"
