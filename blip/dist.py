"""torch.distributed helpers, in one place. Every function is a no-op in a single process."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def bf16_enabled(setting: bool | str, device: torch.device) -> bool:
    """``auto`` → bfloat16 autocast where the hardware computes it natively (CUDA with bf16,
    CPUs with AVX512-BF16/AMX); elsewhere emulated bf16 would be slower than float32."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@contextlib.contextmanager
def train_autocast(device: torch.device, bf16: bool):
    """The context a training step's forward pass runs in: bfloat16 autocast when ``bf16``, and
    on CPU with bf16 the math attention kernel. PyTorch's CPU flash-attention backward in bf16 is
    3-10x slower than the math kernel at our shapes (20 ms vs 4-9 ms per layer; fp32 and forward
    passes are not affected), so with it the tiny preset trains at ~57 instead of ~75 pairs/s
    (``bench/bench_train.py``)."""
    with contextlib.ExitStack() as stack:
        if bf16:
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
            if device.type == "cpu":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` under torchrun → this rank's GPU
    (``LOCAL_RANK``); asking for CUDA where there is none raises, naming the setting."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here; use device: cpu or auto")
    if name == "cuda" and is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (momentum features for the queues)."""
    if world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor):
        out = [torch.empty_like(t) for _ in range(world_size())]
        tdist.all_gather(out, t.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        tdist.all_reduce(g)
        return g[rank()]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the gradient path to every rank's input (BLIP's GatherLayer)."""
    if world_size() == 1:
        return t
    return torch.cat(_GatherWithGrad.apply(t), dim=0)


def all_reduce_mean(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Average Python floats over ranks (for logging the global batch's losses)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return (t / world_size()).tolist()
