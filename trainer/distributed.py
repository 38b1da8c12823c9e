"""All distributed plumbing in one place (docs/style.md item 5): nothing else reads ``RANK``.

``init_distributed(backend)`` returns a ``DistContext``; every collective the training
loop needs goes through it, so the same loop runs single-process, under ``torchrun``
(DDP: nccl on CUDA, gloo on CPU) or under ``horovodrun`` (Horovod).

``ctx.gather_with_grad(x)`` concatenates every rank's ``x`` (same shape on every rank) in
rank order; its backward sums the incoming gradients over ranks and hands each rank the
slice of its own ``x``. With that, a loss computed on gathered candidates and averaged over
ranks by DDP has exactly the gradient of the same loss on the concatenated global batch
in one process (tests/test_ddp.py proves it).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from trainer.config import BackendKind

_joined_gloo = False  # see exit_process


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and ``backend``
    ("single", "gloo", "nccl" or "horovod")."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- collectives (no-ops in one process)
    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        # Horovod's own differentiable allgather AVERAGES the gradient over ranks in its
        # backward; the exact global gradient needs the SUM, so both backends use ours.
        return _GatherWithGrad.apply(tensor, self.rank, self.world_size, self.backend == "horovod")

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place on ``tensor``; ``op`` in sum|min|max. Returns ``tensor``."""
        if not self.distributed:
            return tensor
        if self.backend == "horovod":
            import horovod.torch as hvd

            hvd_op = {"sum": hvd.Sum, "min": hvd.Min, "max": hvd.Max}[op]
            tensor.copy_(hvd.allreduce(tensor, op=hvd_op))
            return tensor
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                    "max": dist.ReduceOp.MAX}[op])
        return tensor

    def all_agree(self, flag: bool) -> bool:
        """True only when ``flag`` is True on every rank (one tiny all-reduce)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int64)
        return bool(self.all_reduce(value, "min").item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        if self.backend == "horovod":
            import horovod.torch as hvd

            # Horovod names the collective after type(obj) unless told: rank 0's dict and the
            # other ranks' None would wait on differently named broadcasts forever.
            return hvd.broadcast_object(obj, root_rank=src, name="towerlake.broadcast_object")
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        if self.backend == "horovod":
            import horovod.torch as hvd

            return hvd.allgather_object(obj, name="towerlake.gather_object")
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.backend == "horovod":
            import horovod.torch as hvd

            hvd.allreduce(torch.zeros(1), op=hvd.Sum, name="towerlake.barrier")
            return
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather (equal shapes, rank order). Backward: all-reduce SUM, own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int, horovod: bool) -> torch.Tensor:
        ctx.rank, ctx.rows, ctx.horovod = rank, tensor.shape[0], horovod
        if horovod:
            import horovod.torch as hvd

            return hvd.allgather(tensor.detach().contiguous())
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        if ctx.horovod:
            import horovod.torch as hvd

            grad = hvd.allreduce(grad, op=hvd.Sum)
        else:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows], None, None, None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed(backend: BackendKind = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group the launcher set up.

    ``auto``: Horovod when launched by horovodrun (``HOROVOD_RANK`` set), DDP when launched by
    torchrun/TorchDistributor (``WORLD_SIZE`` > 1), else one process. CUDA gets nccl and one
    device per local rank; CPU gets gloo. ``timeout_s`` bounds every collective, so a rank
    that dies makes the others fail with a message instead of hanging forever.
    """
    if backend not in ("auto", "ddp", "horovod", "single"):
        raise ValueError(f"backend must be auto, ddp, horovod or single, got {backend!r}")
    if backend == "auto":
        if "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
            backend = "horovod"
        elif _env_int("WORLD_SIZE", 1) > 1:
            backend = "ddp"
        else:
            backend = "single"
    if backend == "horovod":
        try:
            import horovod.torch as hvd
        except ImportError as err:
            raise ValueError("backend 'horovod' needs Horovod in the pipeline env: run scripts/setup.sh "
                             "without TOWERLAKE_SKIP_HOROVOD") from err
        hvd.init()
        _share_cpu_threads(hvd.local_size())
        device = _device_for(hvd.local_rank())
        return DistContext(rank=hvd.rank(), world_size=hvd.size(), local_rank=hvd.local_rank(),
                           device=device, backend="horovod")
    if backend == "single" or _env_int("WORLD_SIZE", 1) == 1:
        return DistContext(device=_device_for(0), backend="single")
    local_rank = _env_int("LOCAL_RANK", 0)
    _share_cpu_threads(_env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1)))
    device = _device_for(local_rank)
    pg_backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(pg_backend, timeout=_dt.timedelta(seconds=timeout_s))
    global _joined_gloo
    _joined_gloo = _joined_gloo or pg_backend == "gloo"
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device, backend=pg_backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.backend in ("gloo", "nccl") and dist.is_initialized():
        dist.destroy_process_group()
    elif ctx.backend == "horovod":
        import horovod.torch as hvd

        hvd.shutdown()


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``; a process that joined a gloo group exits without interpreter finalisation.

    Why: gloo's worker threads hold (weak) references to finished collectives and drop them a
    moment after the caller has seen them complete. When that drop frees a tensor that Python
    owns while the interpreter is finalising, taking the GIL ends the worker thread inside a
    C++ destructor and the process aborts (SIGABRT, "terminate called without an active
    exception") after a run that succeeded. Seen in 6 of 205 two-rank runs here (0 of 80 with
    this exit); a core dump showed ``ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllreduceWork ->
    decref_pyobject -> take_gil -> pthread_exit`` while the main thread was in
    ``Py_FinalizeEx``. Everything a job writes (tables, checkpoints, model versions) is
    committed before this is called, so skipping finalisation loses nothing; logs and stdio
    are flushed first.
    """
    if not _joined_gloo:
        sys.exit(code)
    _flush_and_exit(code)


def exit_without_finalising_at_interpreter_exit() -> None:
    """``exit_process`` for code that returns to a launcher's wrapper instead of exiting itself
    (TorchDistributor's script pickles the function's result after it returns): once the
    wrapper's code is done, an ``atexit`` hook ends the process with ``os._exit``, before the
    interpreter starts finalising (atexit hooks run first). The exit status stays honest:
    1 when an exception reached the top (``sys.last_value``), else 0. No-op without gloo."""
    if _joined_gloo:
        atexit.register(lambda: _flush_and_exit(1 if getattr(sys, "last_value", None) is not None else 0))


def _flush_and_exit(code: int) -> NoReturn:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing to flush to
            stream.flush()
    os._exit(code)


def _share_cpu_threads(local_processes: int) -> None:
    """Several ranks on one machine each get their share of the cores (unless OMP_NUM_THREADS
    says otherwise): oversubscribed intra-op threads made CPU steps 10x slower here."""
    if "OMP_NUM_THREADS" not in os.environ and local_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("TOWERLAKE_FORCE_CPU") != "1":
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP-wrap for torchrun; Horovod and single process use the module as it is (Horovod
    averages gradients through its DistributedOptimizer instead)."""
    if ctx.backend in ("gloo", "nccl") and ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, ctx: DistContext):
    """Horovod: DistributedOptimizer + broadcast of initial parameters and optimizer state
    from rank 0. DDP already broadcasts parameters when it wraps the model."""
    if ctx.backend != "horovod" or not ctx.distributed:
        return optimizer
    import horovod.torch as hvd

    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    # A fresh optimizer has no state and the same hyperparameters on every rank. Horovod would
    # "initialise" it with a zero-gradient step(), which advances Adam's step count (so its
    # bias correction differs from DDP's and single-process training) and applies weight decay once.
    if optimizer.state_dict()["state"]:
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    return optimizer
