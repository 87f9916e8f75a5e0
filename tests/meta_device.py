"""Run pyrovi's device code on torch's ``meta`` device, as a stand-in for a GPU on a CPU machine.

A meta tensor has a shape, a dtype and a device but no values. Any tensor that pyrovi creates
on the CPU by mistake (a ``torch.zeros(n)`` without ``device=``, a table kept on the host)
and then combines with the model's tensors raises "Tensor on device cpu is not on the
expected device meta!", which is the error such code gives on CUDA. What a meta tensor
cannot do is hand values to the host; :class:`MetaHost` answers those requests (``.item()``,
``float()``, ``.cpu()``, ``.numpy()``...) with placeholder values (ones for floats and
booleans, zeros for integer arrays, one for integer scalars), so that training loops,
validation and outputs run to their end. The numbers that come out mean nothing: tests check
devices and shapes, never values.

What it cannot see: CUDA-only branches (``device.type == "cuda"``: CUDA generator states,
the fused Adam kernel), numerical differences between CPU and GPU kernels, memory, and
code whose control flow depends on values (it follows the placeholders' branch only).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

META = torch.device("meta")

_TO_SCALAR = {
    torch.Tensor.item: None,
    torch.Tensor.__float__: float,
    torch.Tensor.__int__: int,
    torch.Tensor.__index__: int,
    torch.Tensor.__bool__: bool,
}


def _placeholder(tensor: torch.Tensor) -> np.ndarray:
    """Host values standing in for a meta tensor's: ones (floats, booleans) or zeros (integers).

    Ones keep divisions and logarithms finite; zeros keep integer arrays valid as indices.
    """
    dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    fill = np.ones if tensor.is_floating_point() or tensor.dtype == torch.bool else np.zeros
    return fill(tuple(tensor.shape), dtype=dtype)


def _is_host_device(value) -> bool:
    return isinstance(value, str | torch.device) and torch.device(value).type == "cpu"


class MetaHost(TorchFunctionMode):
    """Answer host transfers of meta tensors with placeholders (see the module docstring).

    Also gives ``torch.repeat_interleave`` of meta repeats an output size (any size keeps the
    shapes derived from it consistent), which meta tensors otherwise refuse.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type == "meta":
            if func in _TO_SCALAR:
                cast = _TO_SCALAR[func]
                integer = first.dtype != torch.bool and not first.is_floating_point()
                value = 1 if integer else _placeholder(first).reshape(-1)[:1].sum().item()
                return value if cast is None else cast(value)
            if func in (torch.Tensor.numpy, torch.Tensor.__array__):
                return _placeholder(first)
            if func is torch.Tensor.tolist:
                return _placeholder(first).tolist()
            to_host = func is torch.Tensor.cpu or (
                func is torch.Tensor.to
                and any(_is_host_device(a) for a in [*args[1:], kwargs.get("device")])
            )
            if to_host:
                return torch.from_numpy(_placeholder(first))
        if (func is torch.repeat_interleave and len(args) >= 2
                and isinstance(args[1], torch.Tensor) and args[1].device.type == "meta"
                and "output_size" not in kwargs):
            kwargs = {**kwargs, "output_size": int(args[1].numel())}
        return func(*args, **kwargs)


def assert_on_meta(module: torch.nn.Module) -> None:
    """Every parameter and buffer of ``module`` is on the meta device."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.device == META, f"{name} is on {tensor.device}"
