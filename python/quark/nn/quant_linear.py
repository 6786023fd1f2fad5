"""QuantLinear: a drop-in replacement for nn.Linear at inference, with packed quantized weights.

The packed tensors are buffers named like QuantizedTensor.state() keys (data, scales, zeros), so a
model's state_dict saves to safetensors as is and every layer reloads through
QuantizedTensor.from_state with its checks. Forward is quark.ops.qlinear (C++ GEMV/GEMM on CPU).
"""
import torch
import torch.nn as nn

from quark.ops.quant import QuantizedTensor, qlinear, quantize


class QuantLinear(nn.Module):
    def __init__(self, qt: QuantizedTensor, bias=None):
        super().__init__()
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        self.scheme, self.group_size = qt.scheme, qt.group_size
        self.out_features, self.in_features = qt.shape
        for name, t in qt.tensors().items():
            self.register_buffer(name, t)
        if bias is not None:
            bias = bias.detach().to(torch.float32).reshape(-1).contiguous()
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme="int4", group_size=32):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls(quantize(linear.weight, scheme, group_size), linear.bias)

    @property
    def qweight(self):
        """The layer's QuantizedTensor over its buffers, checked once per set of buffer tensors: forward
        runs once per decoded token, and re-checking the scales each call cost a third of a decode step."""
        zeros = self.zeros if self.scheme == "int4" else None
        qt = self.__dict__.get("_qweight")
        if qt is None or qt.data is not self.data or qt.scales is not self.scales or qt.zeros is not zeros:
            qt = QuantizedTensor(self.scheme, (self.out_features, self.in_features), self.data, self.scales, zeros,
                                 self.group_size)
            self.__dict__["_qweight"] = qt   # a plain attribute: not a buffer, not in the state_dict
        return qt

    def forward(self, x):
        return qlinear(x, self.qweight, self.bias)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not cast the scales (the kernels read int4's as bf16, int8's as fp32) or
        # round the fp32 bias (bf16 activations are handled inside the kernels): hold them out of the
        # cast and move them by device only.
        held = {n: self._buffers.pop(n) for n in ("scales", "bias") if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device
        for n, t in held.items():
            self._buffers[n] = t.to(device)
        return self

    def extra_repr(self):
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}, "
                f"bias={self.bias is not None}")
