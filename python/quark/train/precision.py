"""What this device computes in and how fast: the autocast precision a run resolves "auto" to, and
the measured matmul FLOP/s ceiling (the denominator of MFU in training logs and of plan estimates)."""
import time
from functools import lru_cache

import torch


def resolve_precision(precision, device):
    """auto -> bfloat16 where bf16 matmuls are native (AVX512-BF16 or AMX CPUs, Ampere+ GPUs: 1.5-2x
    faster steps here), float32 elsewhere (emulated bf16 would be slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    import quark
    features = quark.info()["cpu_features"]
    return "bfloat16" if features.get("avx512_bf16") or features.get("amx_bf16") else "float32"


@lru_cache(maxsize=None)
def _peak_flops(device_type, dtype, threads):
    """Best of repeated square matmuls at two sizes: the practical FLOP/s ceiling of this device and
    dtype. Best, not median: the machine is shared, and a ceiling should not include the noise."""
    sizes = (512, 1024) if device_type == "cpu" else (4096, 8192)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device_type, dtype=dtype)
        b = torch.randn(n, n, device=device_type, dtype=dtype)
        for i in range(8):
            if device_type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device_type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:   # the first calls pay for page faults and kernel selection
                best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def measure_peak_flops(device=torch.device("cpu"), dtype=torch.float32):
    """Measured matmul FLOP/s for this process (its thread count): the denominator of our MFU."""
    return _peak_flops(torch.device(device).type, dtype, torch.get_num_threads())
