"""Training on several processes with torch.distributed: the process group, DDP / FSDP2 wrapping, reductions.

    torchrun --nproc_per_node 4 -m mptc train examples/matlm.mpt --data stdlib -o out/matlm
    mptc train examples/matlm.mpt --data stdlib --nproc 4 -o out/matlm      # the same, launched for you

`init()` joins the group torchrun describes in its environment (RANK, WORLD_SIZE, MASTER_ADDR, …):
gloo on CPU, nccl where CUDA is available (each process on GPU LOCAL_RANK). Without a group every
helper here answers as the one process of a group of one, so the trainer reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import MptcError

SHARDS = ("ddp", "fsdp")  # DistributedDataParallel (replicated weights), FSDP2 fully_shard (sharded weights)


def launched() -> bool:
    """Whether this process was started by torchrun (or torch.distributed.run)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init() -> bool:
    """Join the process group torchrun set up (a no-op outside torchrun, or when already joined).
    Returns whether this process is in a group."""
    if dist.is_initialized():
        return True
    if not launched():
        return False
    if backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend())
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this is the process that writes checkpoints and prints (rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """Where this process trains: its GPU under nccl, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (after a barrier, so no rank leaves while another still writes)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """Inside torchrun: join the group for the block and leave it cleanly after. Yields whether joined."""
    joined = not active() and init()
    try:
        yield active()
    finally:
        if joined and active():
            dist.destroy_process_group()  # no barrier: a rank that failed must not hang the others


def mean(values: Sequence[float]) -> list[float]:
    """The mean over ranks of each of `values` (the values themselves in a group of one)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).tolist()


def check_batch(batch: int, world: int | None = None) -> None:
    """Refuse a global batch the ranks cannot split evenly."""
    world = world_size() if world is None else world
    if batch % world:
        lower, upper = batch // world * world, (batch // world + 1) * world
        raise MptcError(f"--batch {batch} does not divide among {world} processes: each process takes an equal "
                        "slice of the global batch", hint=f"use --batch {upper}" + (f" or {lower}" if lower else ""))


def local_slice(x: Tensor) -> Tensor:
    """This rank's rows of a global batch (B, …) → (B / world, …)."""
    n = x.shape[0] // world_size()
    return x[rank() * n: (rank() + 1) * n]


# --- wrapping ---------------------------------------------------------------------------------


def check_shard(shard: str) -> None:
    if shard not in SHARDS:
        raise MptcError(f"--shard must be one of {', '.join(SHARDS)}, got {shard!r}")


def wrap_ddp(model: nn.Module) -> nn.Module:
    """A DistributedDataParallel view of `model` (same parameters; gradients averaged over ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device().index] if device().type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_fsdp(model: nn.Module) -> nn.Module:
    """Shard `model`'s parameters over the ranks with FSDP2, in place (they become DTensors)."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def is_sharded(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t):
    """A whole tensor from a sharded one (a collective: every rank calls it); anything else as it is."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(value: Tensor, param: Tensor) -> Tensor:
    """`value` (shaped as the whole parameter) split the way the sharded `param` is."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(param) or value.shape != param.shape:
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a sharded model, on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in sd.items()}


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with every sharded state tensor whole (collective): the single-process format."""
    sd = opt.state_dict()
    state = {i: {k: full(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


# --- launching ----------------------------------------------------------------------------------


def launch(args: list[str], nproc: int) -> int:
    """Run `python -m mptc ARGS…` on `nproc` local processes under torch.distributed.run (a free
    loopback port); returns its exit status."""
    if nproc < 1:
        raise MptcError(f"--nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mptc", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env).returncode
