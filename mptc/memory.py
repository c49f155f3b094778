"""How much memory a model needs and how much there is: the check that refuses a model too big to
allocate before anything is allocated.

Counts are Python ints, so sizes beyond what a tensor can hold (2^63 - 1 elements) are still
counted and reported exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from .errors import MptcError

INT64_MAX = 2**63 - 1
Axes = tuple[tuple[str, ...], ...]


def available(device: str | torch.device = "cpu") -> int:
    """Bytes of memory free for new tensors on `device`: the GPU's free memory for CUDA, else the
    host's (`MemAvailable` of /proc/meminfo on Linux, else all physical memory)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def count_params(axes: Iterable[Axes], sizes: dict[str, int]) -> int:
    """Elements of tensors whose axes are products of dimension symbols (`lower.NodeInfo.axes`)."""
    return sum(math.prod(math.prod(sizes[s] for s in ax) for ax in tensor) for tensor in axes)


def sci(n: int) -> str:
    """A whole number of any size in two significant digits: 3.1e305 (exactly rounded, no float)."""
    if n < 1000:
        return str(n)
    digits = str(round(n, 2 - len(str(n))))  # rounded to 2 significant digits
    if len(digits) > len(str(n)):  # 9.96e5 rounded up to 1.0e6
        return f"{digits[0]}.{digits[1]}e{len(digits) - 1}"
    return f"{digits[0]}.{digits[1]}e{len(str(n)) - 1}"


def params_text(n: int) -> str:
    """1234567 → '1.23M'; beyond 10^15, '3.1e305'."""
    for unit, k in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if k <= n < 10**15:
            return f"{n / k:.2f}{unit}"
    return sci(n) if n >= 10**15 else str(n)


def bytes_text(n: int) -> str:
    """Bytes in binary units up to EiB ('24 GiB', '1.5 TiB'); beyond, '1.2e306 bytes'."""
    if n >= 1024**7:
        return f"{sci(n)} bytes"
    for unit, k in (("EiB", 1024**6), ("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2),
                    ("KiB", 1024)):
        if n >= k:
            x = n / k
            return f"{x:.0f} {unit}" if x >= 100 else f"{x:.3g} {unit}"  # 3 significant digits
    return f"{n} bytes"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_fits(what: str, params: int, dtype: torch.dtype, device: str | torch.device = "cpu",
               hint: str | None = None, error: type[MptcError] = MptcError) -> None:
    """Raise `error` saying how big the model would be if `params` parameters of `dtype` do not fit
    in the memory available on `device`. `what` opens the message: "this model has", "grow_mlp(…)
    would make a model of"."""
    need = params * dtype.itemsize
    have = available(device)
    if need <= have:
        return
    dev = torch.device(device)
    where = "this machine has" if dev.type != "cuda" else f"{dev} has"
    raise error(f"{what} {params_text(params)} parameters ({bytes_text(need)} in {dtype_name(dtype)}); {where} "
                f"{bytes_text(have)} of memory available", hint=hint)
