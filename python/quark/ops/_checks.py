"""Argument checks at the kernel boundary. Every error names the argument and says what to do.

The C++ kernels take numpy arrays or CPU torch tensors zero-copy and never convert; these checks run
first so a wrong dtype, rank, layout or device raises TypeError/ValueError instead of a copy or a crash.
"""
import numpy as np
import torch

_NP_TO_NAME = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16",
               np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.int32): "int32",
               np.dtype(np.int64): "int64", np.dtype(np.uint16): "uint16", np.dtype(np.uint32): "uint32"}


def dtype_name(a):
    if isinstance(a, torch.Tensor):
        return str(a.dtype).replace("torch.", "")
    return _NP_TO_NAME.get(a.dtype, str(a.dtype))


def device_of(a):
    """'cpu' for numpy arrays and CPU tensors, else the torch device type ('cuda', 'mps', 'meta', ...)."""
    if isinstance(a, np.ndarray):
        return "cpu"
    if isinstance(a, torch.Tensor):
        return a.device.type
    raise TypeError(f"expected a numpy array or torch tensor, got {type(a).__name__}")


def is_contiguous(a):
    return a.flags.c_contiguous if isinstance(a, np.ndarray) else a.is_contiguous()


def check_array(name, a, dtypes, ndim=None, allow_empty=True):
    """Validate one kernel argument; returns it unchanged."""
    if not isinstance(a, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    if dtype_name(a) not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(dtypes)}, got {dtype_name(a)}; "
                        f"convert it first (e.g. {name}.astype(np.float32) / {name}.float())")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if not is_contiguous(a):
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name}) or {name}.contiguous()")
    if not allow_empty and 0 in tuple(a.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(a.shape)}")
    return a


def same_kind(name, a, ref_name, ref):
    if type(a) is not type(ref) and not (isinstance(a, torch.Tensor) and isinstance(ref, torch.Tensor)):
        raise TypeError(f"{name} and {ref_name} must both be numpy arrays or both torch tensors")
    if device_of(a) != device_of(ref):
        raise ValueError(f"{name} is on {device_of(a)} but {ref_name} is on {device_of(ref)}; put them on one device")


def empty_like_kind(ref, shape, dtype=np.float32):
    """A new output array of the same kind (numpy or torch, same device) as `ref`."""
    if isinstance(ref, torch.Tensor):
        return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device=ref.device)
    return np.empty(shape, dtype=dtype)
