"""PyTorch shim: train a ``torch.nn.Module`` through a pserver cluster.

Owns ``DistributedOptimizer`` (a ``torch.optim.Optimizer`` in the Horovod/BytePS
shape: wrap the local optimizer, keys are parameter names), ``PSEmbedding`` (an
embedding whose rows live in a sparse table on the server) and
``state_dict_from_server``. torch is imported by this module only, so importing
``pserver`` never needs it.

Two ways to update, chosen by ``server_optimizer``:

- the server applies its optimizer (``server_optimizer={"name": "adam", ...}``;
  the local optimizer may be None): each step pushes the gradients and copies the
  values the server returns into the parameters;
- the server only averages (``server_optimizer=None`` with a local optimizer, in
  ``sync`` mode): each step pushes the gradients, takes the mean gradient of all
  workers from the server as ``.grad`` and lets the local optimizer step.

Pushes start during backward, so they overlap with the rest of it: a
post-accumulate-grad hook per parameter puts its gradient in a bucket, and each
bucket of ``bucket_bytes`` (4 MiB) starts one ``push_pull_async``, as DDP buckets
its all-reduces; ``step`` pushes the last bucket and waits for them all. Gradient
accumulation over several backward passes per step needs
``backward_passes_per_step=N`` (as in Horovod): the hooks push a gradient on its
N-th pass only, and a pass more than that before ``step`` raises instead of
pushing a partial gradient twice. Worker 0 creates the keys from its parameters;
every worker then starts from the server's values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from .client import Client

INIT_PREFIX = "init/"  # sum mode: the starting parameters, read once by every worker
BUCKET_BYTES = 4 << 20  # gradients pushed during backward go in buckets of about this size


class DistributedOptimizer(torch.optim.Optimizer):
    """An optimizer whose steps go through the parameter server; see the module."""

    def __init__(self, optimizer: torch.optim.Optimizer | None,
                 named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *,
                 client: Client, mode: str | None = None,
                 server_optimizer: dict[str, Any] | None = None,
                 staleness: int | None = None, overlap: bool = True,
                 bucket_bytes: int = BUCKET_BYTES, backward_passes_per_step: int = 1) -> None:
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be at least 1")
        self.client = client
        self.local = optimizer
        self.named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not self.named:
            raise ValueError("no parameters that require gradients")
        if optimizer is None and server_optimizer is None:
            raise ValueError("give a local optimizer, a server_optimizer, or both")
        self.server_side = server_optimizer is not None
        if not self.server_side and (mode or "sync") != "sync":
            raise ValueError("with a local optimizer the server averages gradients, which "
                             "needs mode='sync'; use server_optimizer for async or ssp")
        self.mode = mode if mode is not None else ("sync" if not self.server_side else None)
        self.staleness = staleness
        self.server_optimizer = server_optimizer if self.server_side else {"name": "sum"}
        groups = optimizer.param_groups if optimizer is not None else [
            {"params": [p for _, p in self.named], "lr": server_optimizer.get("lr", 0.01)
             if server_optimizer else 0.01}]
        # Not calling super().__init__: param_groups and state are the local optimizer's.
        self.param_groups = groups
        self.defaults = optimizer.defaults if optimizer is not None else {}
        self.state = optimizer.state if optimizer is not None else {}  # type: ignore[assignment]
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._futures: dict[str, Future[dict[str, np.ndarray[Any, Any]]]] = {}
        self._bucket: dict[str, np.ndarray[Any, Any]] = {}
        self._bucket_nbytes = 0
        self.bucket_bytes = bucket_bytes
        self.backward_passes_per_step = backward_passes_per_step
        self._passes: dict[str, int] = {}  # backward passes per parameter since the step
        self._hooks: list[Any] = []
        self.steps = 0
        self._start()
        if overlap:
            for name, p in self.named:
                self._hooks.append(p.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                    self._pusher(name)))

    # -- set-up ----------------------------------------------------------------------

    def _start(self) -> None:
        """Worker 0 creates the keys from its parameters; all start from its values."""
        values = {n: _numpy(p) for n, p in self.named}
        if self.client.worker_id == 0:
            if self.server_side:
                self.client.init(values, optimizer=self.server_optimizer, mode=self.mode,
                                 staleness=self.staleness)
            else:
                self.client.init({INIT_PREFIX + n: v for n, v in values.items()},
                                 optimizer={"name": "sum"}, mode="async")
                self.client.init({n: np.zeros_like(v) for n, v in values.items()},
                                 optimizer={"name": "sum"}, mode="sync")
        self.client.barrier()
        keys = [n if self.server_side else INIT_PREFIX + n for n, _ in self.named]
        pulled = self.client.pull(keys)
        with torch.no_grad():
            for (_, p), k in zip(self.named, keys, strict=True):
                p.copy_(torch.from_numpy(pulled[k]).reshape(p.shape))

    def _pusher(self, name: str) -> Callable[[torch.Tensor], None]:
        """The hook of one parameter: its gradient joins the bucket, and a bucket of
        ``bucket_bytes`` or more starts its push (one request per shard for the
        whole bucket, not one per parameter)."""
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            passes = self._passes[name] = self._passes.get(name, 0) + 1
            if passes > self.backward_passes_per_step:
                raise RuntimeError(
                    f"the gradient of {name!r} was computed {passes} times before step(), "
                    f"but it is pushed after {self.backward_passes_per_step} backward "
                    "pass(es): to accumulate gradients over N backward passes, create the "
                    "DistributedOptimizer with backward_passes_per_step=N (or overlap=False)")
            if passes < self.backward_passes_per_step:
                return  # accumulating: pushed on the last pass
            grad = param.grad.detach().contiguous().numpy()
            self._bucket[name] = grad
            self._bucket_nbytes += grad.nbytes
            if self._bucket_nbytes >= self.bucket_bytes:
                future = self.client.push_pull_async(self._bucket)
                self._futures.update(dict.fromkeys(self._bucket, future))
                self._bucket, self._bucket_nbytes = {}, 0
        return hook

    # -- the Optimizer interface ------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Push the gradients not yet pushed by the hooks, wait for all, then apply:
        the server's values (server optimizer) or the mean gradient (local)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._bucket, self._bucket_nbytes = {}, 0  # pushed below with the rest
        self._passes.clear()
        missing = {n: p.grad.detach().contiguous().numpy() for n, p in self.named
                   if p.grad is not None and n not in self._futures}
        results: dict[str, np.ndarray[Any, Any]] = {}
        if missing:
            results.update(self.client.push_pull(missing))
        for fut in {id(f): f for f in self._futures.values()}.values():
            results.update(fut.result())
        self._futures.clear()
        for name, p in self.named:
            if name not in results:
                continue  # no gradient this step: nothing was pushed
            value = torch.from_numpy(results[name]).reshape(p.shape)
            if self.server_side:
                p.copy_(value)
            else:
                p.grad.copy_(value)  # type: ignore[union-attr]
        if self.local is not None and not self.server_side:
            self.local.step()
        self.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.local is not None:
            self.local.zero_grad(set_to_none=set_to_none)
        else:
            for _, p in self.named:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        local = self.local.state_dict() if self.local is not None else {}
        return {"local": local, "pserver": {
            "keys": [n for n, _ in self.named], "server_optimizer": self.server_optimizer,
            "mode": self.mode, "steps": self.steps}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.local is not None and state_dict.get("local"):
            self.local.load_state_dict(state_dict["local"])
        self.steps = int(state_dict.get("pserver", {}).get("steps", 0))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def state_dict_from_server(client: Client, keys: Sequence[str] | None = None,
                           shapes: dict[str, torch.Size] | None = None,
                           ) -> dict[str, torch.Tensor]:
    """The server's values as a state dict (``model.load_state_dict`` restores a
    trained model): every dense key (or ``keys``), reshaped to ``shapes`` if given.
    ``ValueError`` for the keys of a ``DistributedOptimizer`` with a local optimizer:
    the server holds the last mean gradient there, the weights live in the workers
    (save ``model.state_dict()`` from a worker instead)."""
    metas = client.keys()
    names = list(keys) if keys is not None else [k for k in metas
                                                 if not k.startswith(INIT_PREFIX)]
    averaged = [k for k in names if k in metas and metas[k].optimizer == "sum"
                and INIT_PREFIX + k in metas]
    if averaged:
        raise ValueError(
            f"keys {averaged[:3]}{' ...' if len(averaged) > 3 else ''} hold the mean gradient "
            "of the last step, not weights: with a local optimizer the server only averages "
            "gradients and the weights live in the workers; save model.state_dict() from a "
            "worker (or train with server_optimizer=...)")
    values = client.pull(names)
    return {k: torch.from_numpy(v.copy()).reshape(shapes[k]) if shapes and k in shapes
            else torch.from_numpy(v.copy()) for k, v in values.items()}


class _Rows(torch.autograd.Function):
    """Rows pulled from a table; backward pushes their gradients to the server."""

    @staticmethod
    def forward(ctx: Any, weight_anchor: torch.Tensor, ids: torch.Tensor,
                rows: torch.Tensor, emb: PSEmbedding) -> torch.Tensor:
        ctx.ids, ctx.emb = ids, emb
        return rows

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        ids = ctx.ids.reshape(-1).numpy().astype(np.uint64)
        g = grad.reshape(len(ids), -1).contiguous().numpy()
        ctx.emb.client.push_rows(ctx.emb.table, ids, g)
        return None, None, None, None


class PSEmbedding(torch.nn.Module):
    """``torch.nn.Embedding`` whose rows live in a sparse table on the server: the rows
    of each batch are pulled in ``forward`` and their gradients pushed in backward
    (the server applies the table's optimizer, adagrad by default). Tables grow as
    ids appear; ``num_embeddings`` is not needed."""

    def __init__(self, client: Client, table: str, embedding_dim: int, *,
                 optimizer: dict[str, Any] | None = None,
                 init: tuple[Any, ...] = ("normal", 0.01)) -> None:
        super().__init__()
        self.client, self.table, self.embedding_dim = client, table, embedding_dim
        client.create_table(table, embedding_dim, optimizer=optimizer, init=init)
        # autograd needs an input that requires grad to call backward at all
        self._anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"embedding ids must be integers, not {ids.dtype} "
                            "(as torch.nn.Embedding requires)")
        flat = ids.reshape(-1).to(torch.int64)
        rows = torch.from_numpy(self.client.pull_rows(self.table, flat.numpy()))
        out: torch.Tensor = _Rows.apply(self._anchor, flat, rows, self)  # type: ignore[no-untyped-call]
        return out.reshape(*ids.shape, self.embedding_dim)


class PSEmbeddingBag(PSEmbedding):
    """``torch.nn.EmbeddingBag`` on a server table: ``forward(ids, offsets)`` sums
    (``mode="sum"``) or averages (``"mean"``) the rows of each bag; bags start at
    ``offsets`` in the flat ``ids`` (or are the rows of a 2-D ``ids``)."""

    def __init__(self, client: Client, table: str, embedding_dim: int, *,
                 mode: str = "mean", optimizer: dict[str, Any] | None = None,
                 init: tuple[Any, ...] = ("normal", 0.01)) -> None:
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', not {mode!r}")
        super().__init__(client, table, embedding_dim, optimizer=optimizer, init=init)
        self.mode = mode

    def forward(self, ids: torch.Tensor,
                offsets: torch.Tensor | None = None) -> torch.Tensor:
        if offsets is None:
            if ids.dim() != 2:
                raise ValueError("give offsets, or ids as a 2-D tensor of equal bags")
            offsets = torch.arange(0, ids.numel(), ids.shape[1])
        flat = ids.reshape(-1)
        rows = super().forward(flat)
        bags = len(offsets)
        # the bag of each id: the last offset at or before its position (empty bags ok)
        bag = torch.searchsorted(offsets.to(torch.int64), torch.arange(len(flat)),
                                 right=True) - 1
        out = torch.zeros(bags, self.embedding_dim, dtype=rows.dtype).index_add(0, bag, rows)
        if self.mode == "mean":
            counts = torch.bincount(bag, minlength=bags).clamp(min=1).to(rows.dtype)
            out = out / counts[:, None]
        return out


def _numpy(p: torch.Tensor) -> np.ndarray[Any, Any]:
    return p.detach().cpu().contiguous().numpy().copy()


class _DDPHookState:
    """What the DDP communication hook needs: the client and each parameter's key."""

    def __init__(self, client: Client, names: dict[int, str]) -> None:
        self.client = client
        self.names = names


def register_ddp_hook(ddp: torch.nn.parallel.DistributedDataParallel,
                      client: Client) -> None:
    """Make ``ddp`` average its gradients through the parameter server instead of an
    all-reduce: every bucket's gradients are pushed (keys are parameter names, sync
    ``sum`` keys) and the mean of all workers' gradients comes back as the bucket.
    Worker 0 creates the keys; call before the first backward, on every worker."""
    named = [(n, p) for n, p in ddp.module.named_parameters() if p.requires_grad]
    if client.worker_id == 0:
        client.init({n: np.zeros(tuple(p.shape), np.float32) for n, p in named},
                    optimizer={"name": "sum"}, mode="sync")
    client.barrier()
    import torch.distributed as dist

    # DDP compares the hook's annotations with these objects; this module's are strings
    _ddp_hook.__annotations__.update(bucket=dist.GradBucket,  # type: ignore[attr-defined]
                                     **{"return": torch.futures.Future[torch.Tensor]})
    ddp.register_comm_hook(_DDPHookState(client, {id(p): n for n, p in named}), _ddp_hook)


def _ddp_hook(state: _DDPHookState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """Push one bucket's gradients; its future resolves to the bucket of means."""
    buffer = bucket.buffer()
    base = buffer.storage_offset()
    parts = [(state.names[id(p)], g) for p, g in zip(bucket.parameters(), bucket.gradients(),
                                                     strict=True)]
    pushed = state.client.push_pull_async(
        {n: g.detach().contiguous().numpy() for n, g in parts})
    out: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def done(fut: Future[dict[str, np.ndarray[Any, Any]]]) -> None:
        try:
            means = fut.result()
            result = torch.empty_like(buffer)
            for n, g in parts:
                start = g.storage_offset() - base
                result[start:start + g.numel()] = torch.from_numpy(means[n]).reshape(-1)
            out.set_result(result)
        except BaseException as exc:
            out.set_exception(exc)  # type: ignore[arg-type]

    pushed.add_done_callback(done)
    return out
