"""Data-parallel training over torch.distributed ranks: the rank's context, data sharding, model wrapping.

One training stage on N GPUs runs as N processes launched by ``torchrun`` (the worker does it); each calls
:func:`init_from_env` and hands the :class:`DistContext` to ``fit(dist=...)`` and to the frozen passes
(:func:`shard_range` / :func:`gather_shards`). Nothing here reads the environment except :func:`init_from_env`,
which reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``).

Two strategies, both torch's own engines (no home-made all-reduce):

* **ddp**: :class:`torch.nn.parallel.DistributedDataParallel`, a full replica per rank (the student and its
  AdamW state must fit one GPU).
* **fsdp**: FSDP2, :func:`torch.distributed.fsdp.fully_shard` on every transformer block and then on the root,
  so parameters, gradients and optimizer state are sharded over the ranks; bf16 compute with fp32 gradient
  reduction (``MixedPrecisionPolicy``) when the stage trains in bf16, fp32 otherwise.

Both average gradients over ranks; ``fit`` scales each rank's loss so the average is the gradient of the global
batch mean (see ``ctpd_core.train``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NoReturn

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)

DistStrategy = Literal["ddp", "fsdp"]
_STRATEGIES = ("ddp", "fsdp")
_PRECISIONS = ("auto", "fp32", "bf16")

# How long a collective may wait for a peer before the process group gives up. A rank that died makes torchrun's
# agent tear the others down within seconds; this bound only matters when a peer hangs without dying.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group (the default group, which :func:`init_from_env` creates)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that reports to the observer and writes the checkpoint's small files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def _reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        # On this rank's device: NCCL reduces CUDA tensors only (gloo takes CPU tensors).
        reduced = value.detach().to(device=self.device, dtype=torch.float64 if value.dtype == torch.float64
                                    else torch.float32).clone()
        if self.world_size > 1:
            torch_dist.all_reduce(reduced, op=torch_dist.ReduceOp.SUM)  # gloo has no ReduceOp.AVG
        return reduced

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``value`` (float), on this rank's device; every rank gets it."""
        return self._reduce_sum(value)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of ``value`` (float), on this rank's device; every rank gets it."""
        return self._reduce_sum(value) / self.world_size

    def any_true(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any: ranks agree to stop at the same step, so no rank is
        left waiting in a collective that the others never enter."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (picklable; small: paths, flags, decisions)."""
        if self.world_size == 1:
            return obj
        holder = [obj if self.rank == src else None]
        torch_dist.broadcast_object_list(holder, src=src, device=self.device)
        return holder[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered


def init_from_env(device_type: str | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment; idempotent (a second call returns the same
    context without re-initialising).

    ``device_type`` ``"cuda"`` or ``"cpu"``; None picks cuda when it is available. On cuda each rank uses
    ``cuda:LOCAL_RANK`` and NCCL; on cpu, gloo. Without torchrun's variables (a plain single process) this is
    a world of one, and no process group is created: callers pass ``dist=None`` or this context alike.
    """
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in os.environ]
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu' (or None to pick), got {device_type!r}.")
    if missing:
        if len(missing) < 3:
            raise RuntimeError(
                f"torchrun's environment is incomplete (missing {', '.join(missing)}); launch the ranks with "
                "`python -m torch.distributed.run` (torchrun), which sets RANK, WORLD_SIZE and LOCAL_RANK."
            )
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        return DistContext(rank=0, world_size=1, local_rank=0, device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; launch at "
                "most one rank per GPU (torchrun --nproc-per-node <= the GPUs in CUDA_VISIBLE_DEVICES)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend=backend,
            timeout=COLLECTIVE_TIMEOUT,
            # NCCL binds the group to the rank's GPU up front (no guessing a device at the first collective).
            device_id=device if device_type == "cuda" else None,
        )
        logger.info("rank %d of %d joined the process group (%s, %s)", rank, world_size, backend, device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def exit_rank(code: int) -> NoReturn:
    """End a rank process with ``code``: leave the process group (on success), flush, and exit without
    interpreter finalization.

    Why not a plain return: the process group's C++ side can outlive ``destroy_process_group`` (FSDP2's device
    meshes and DDP's reducer keep references to it), and when its worker threads are torn down during interpreter
    finalization the process can abort with "terminate called without an active exception" (pytorch#190489) after
    all its work is done and written. torchrun then reports the rank as failed, and a job that succeeded is retried
    as lost. A rank has put everything it produces in files or sent it over the control channel before it calls
    this, so skipping finalization loses nothing. A failing rank (``code`` not 0) does not leave the group: its
    peers may be inside a collective it will never join, and torchrun tears them down once it has exited.
    """
    try:
        if code == 0 and torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    finally:
        logging.shutdown()  # flushes every handler (the rank's log lines reach the job process's log)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to flush into
                stream.flush()
        os._exit(code)


def is_distributed(ctx: DistContext | None) -> bool:
    """Whether ``ctx`` means more than one rank (None and a world of one are single-process training)."""
    return ctx is not None and ctx.world_size > 1


def shard_bounds(num_items: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous slice of ``num_items`` when they are split over ``world_size`` ranks: the
    first ``num_items % world_size`` ranks get one item more, so sizes differ by at most one."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_range(num_items: int, ctx: DistContext | None) -> range:
    """The items of ``num_items`` this rank processes in a frozen pass (all of them without ``ctx``)."""
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}.")
    if ctx is None:
        return range(num_items)
    return shard_bounds(num_items, ctx.rank, ctx.world_size)


def gather_shards(local_rows: Sequence[Any], ctx: DistContext | None) -> list[Any]:
    """Every rank's ``local_rows`` (the rows of its :func:`shard_range`), joined back in the original order, on
    every rank. Rows are pickled (tensors travel as CPU tensors: move them off the GPU before)."""
    if ctx is None or ctx.world_size == 1:
        return list(local_rows)
    joined: list[Any] = []
    for rows in ctx.gather_objects(list(local_rows)):
        joined.extend(rows)
    return joined


# ------------------------------------------------------------------------------------------------ wrapping


class TrainingStep(torch.nn.Module):
    """A model and its loss as one module, whose ``forward(items)`` is ``loss_fn(model, items)``: what fit wraps
    with DDP / FSDP2.

    Wrapping the *loss* rather than the model is what lets a ``loss_fn`` use the model as a plain Hugging Face
    model (``model_label_logprobs`` runs ``get_decoder()`` and applies ``get_output_embeddings().weight`` itself,
    never ``model(...)``): DDP prepares its gradient reduction in its ``forward``, and FSDP2 gathers the root's
    parameters (embeddings, head, final norm) in its root ``forward``, so both must see the whole loss computation
    as one forward call. Inside it the loss sees the unwrapped model, with FSDP2's blocks gathering their own
    parameters when they run."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Sequence[Any]], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, items: Sequence[Any]) -> Any:
        return self.loss_fn(self.model, items)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model``, the units FSDP shards and activation checkpointing recomputes.

    A Hugging Face model names its block classes in ``_no_split_modules`` (``LlamaDecoderLayer``); a model
    without it (a LoRA wrapper hides it one level down, so every submodule is asked) falls back to the
    children of its ``nn.ModuleList``s (GPT-2's ``transformer.h``)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        blocks = [child for module in model.modules() if isinstance(module, torch.nn.ModuleList)
                  for child in module.children()]
    return blocks


def uses_bf16(precision: str, device: torch.device) -> bool:
    """``fit``'s precision rule: bf16 when asked, or ``auto`` on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def prepare_model(
    model: torch.nn.Module,
    *,
    ctx: DistContext,
    strategy: DistStrategy,
    precision: str,
    activation_checkpointing: bool,
) -> torch.nn.Module:
    """``model`` ready for data-parallel training on ``ctx``'s rank: moved to its device, blocks wrapped for
    activation checkpointing if asked, then DDP or FSDP2. Returns the module to call (DDP: a wrapper; FSDP2:
    ``model`` itself, sharded in place). ``fit`` passes a :class:`TrainingStep` (the model and its loss), so the
    loss may use the model's parts directly; a caller that only ever calls ``model(...)`` may pass the model.
    Parameter names as the state-dict helpers see them (``torch.distributed.checkpoint.state_dict``) stay the
    unwrapped model's."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(_STRATEGIES)}, got {strategy!r} "
                         "('auto' is resolved by the memory planner before fit).")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}.")
    model.to(ctx.device)
    if activation_checkpointing:
        apply_block_checkpointing(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if uses_bf16(precision, ctx.device):
        # bf16 all-gathers and compute, fp32 gradient reduce-scatter: sums over ranks keep fp32 precision, and the
        # sharded master weights and AdamW state stay fp32 (fit checks they are).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    # Blocks first, then the root (embeddings, final norm, head): each block's parameters are gathered only while
    # it runs. With activation checkpointing the blocks are now the wrappers, which hold the same parameters.
    blocks = [module for module in model.modules() if isinstance(module, _checkpoint_wrapper_type())]
    for block in blocks or transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _checkpoint_wrapper_type() -> type[torch.nn.Module]:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return CheckpointWrapper


def apply_block_checkpointing(model: torch.nn.Module) -> None:
    """Wrap every transformer block of ``model`` in place so its activations are recomputed in the backward.

    torch's non-reentrant ``checkpoint_wrapper`` rather than HF's ``gradient_checkpointing_enable()``: it works on
    any module (not only a PreTrainedModel), composes with ``fully_shard`` (wrap first, then shard the wrapped
    block, as torchtitan does) and with DDP's ``no_sync`` (the reentrant variant breaks both, and under LoRA needs
    inputs that require grad), and it leaves the model's config alone. Its ``_checkpoint_wrapped_module.`` name
    component is stripped by the state-dict helpers and by the wrapper's own ``state_dict`` hooks, so checkpoints
    and ``save_pretrained`` keep the plain names. Idempotent: already wrapped blocks are left as they are."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    wrapper_type = _checkpoint_wrapper_type()
    if any(isinstance(module, wrapper_type) for module in model.modules()):
        return
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"activation_checkpointing needs transformer blocks to wrap, and {type(model).__name__} has none "
            "(no _no_split_modules classes, no nn.ModuleList); turn activation_checkpointing off."
        )
    block_ids = {id(block) for block in blocks}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: id(module) in block_ids,
    )


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """FSDP2: whether the next backward reduces gradients (False during accumulation but the last micro-batch).
    DDP does the same with its ``no_sync()`` context (``fit`` uses it directly)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


# Name components wrappers insert: the checkpoint wrapper's, torch.compile's, FSDP1's (DDP's leading ``module.``
# is stripped only on a DDP model: a model may have a submodule of its own called ``module``).
_WRAPPER_NAME_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def unwrapped_name(name: str, model: torch.nn.Module) -> str:
    """A parameter name of a prepared model as the unwrapped model names it: without DDP's leading ``module.``,
    the checkpoint wrapper's and torch.compile's components."""
    from torch.nn.parallel import DistributedDataParallel

    parts = name.split(".")
    if isinstance(model, DistributedDataParallel) and parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(part for part in parts if part not in _WRAPPER_NAME_PARTS)
