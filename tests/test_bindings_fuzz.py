"""Fuzz every binding of quark._C (enumerated from the module, signatures parsed from nanobind's
docstrings) with random shapes, dtypes (float64, float16, bf16, ints, bool...), strides (transposed,
stepped, Fortran order), 0-size and wrong-ndim arrays, read-only outputs, torch's meta device, wrong
Python types, edge scalars, and packed weights whose source arrays are gone. Every call must return
or raise TypeError / ValueError: never crash, hang or raise anything else.

A binding that takes a file descriptor (VectorIndex.restore's fd) may also raise OSError: a read
through a bad fd fails as os.pread's would.

Array sizes come from a small pool per example, so arguments often agree with each other and calls
get past the first shape check into the deeper ones and the kernels.

Deterministic by default, so CI cannot go red by chance: the examples derive from the test itself
(hypothesis' derandomize, no example database). To explore new ones, set QUARK_FUZZ_SEED to an integer
(another fixed set, reproducible) or to "random" (fresh ones each run; pytest's --hypothesis-seed then
applies), and QUARK_FUZZ_EXAMPLES to the examples per binding (default 100), e.g.

    for s in $(seq 1 50); do QUARK_FUZZ_SEED=$s python -X faulthandler -m pytest -q tests/test_bindings_fuzz.py || break; done

A failing example prints its call; -X faulthandler names the binding of a crash (-v the test)."""
import os
import re
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from quark import _C
from quark.ops import quantize

EXAMPLES = int(os.environ.get("QUARK_FUZZ_EXAMPLES", "100"))
SEED = os.environ.get("QUARK_FUZZ_SEED")   # unset: derandomized (CI); an int; or "random"
DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "uint8", "int32", "uint32", "int64", "uint64", "bool"]
TMP = tempfile.gettempdir()
DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
WORDS = ["l2", "ip", "cosine", "hnsw", "flat", "fp32", "sq8", "memory", "file", "int4", "int8", "w8a8", "word", "char",
         "scalar", "avx2", "avx512", "", "L2", "\x00", "é" * 3]
ALLOWED = (TypeError, ValueError)
FD_ALLOWED = ALLOWED + (OSError,)   # for bindings with an fd argument
# calls that change process-wide state: restored after each example
STATEFUL = {"set_isa": lambda: _C.current_isa(), "set_num_threads": lambda: _C.num_threads()}


def parse_params(sig):
    """'f(a: ndarray[dtype=float32, shape=(*, *)], b: int | None = 3) -> None' -> [(name, type)]."""
    inner = sig[sig.index("(") + 1: sig.rindex(") ->")] if ") ->" in sig else sig[sig.index("(") + 1: sig.rindex(")")]
    params, depth, cur = [], 0, ""
    for ch in inner + ",":
        if ch == "," and depth == 0:
            if cur.strip():
                name, _, typ = cur.strip().partition(": ")
                params.append((name, typ.split(" = ")[0]))
            cur = ""
            continue
        depth += ch in "[(" and 1 or 0
        depth -= ch in "])" and 1 or 0
        cur += ch
    return [(n, t) for n, t in params if n != "self"]


def signatures(obj, name):
    """nanobind's signature lines of a function or method (one per overload)."""
    lines = [ln.strip("`") for ln in (obj.__doc__ or "").splitlines()]
    return [ln for ln in lines if re.match(rf"^(\d+\. ``)?{re.escape(name)}\(", ln.lstrip("0123456789. `"))] or lines[:1]


def spec_of(typ):
    """The declared dtype and ndim of an ndarray parameter, if any."""
    dtype = re.search(r"dtype=(\w+)", typ)
    shape = re.search(r"shape=\(([^)]*)\)", typ)
    return (dtype[1] if dtype else None), (len([s for s in shape[1].split(",") if s.strip()]) if shape else None)


class Draw:
    """One example's choices, from a seeded Random (hypothesis' own draws lean to edge cases, so nearly
    every argument would be malformed and every call would stop at its first check). Most arguments
    are well formed (the declared dtype, or this example's dtype where none is declared; the declared
    ndim, or this example's; C order, writable, CPU), so calls get past the type checks into the shape
    checks and the kernels; the rest are anything."""

    def __init__(self, rnd):
        self.rnd = rnd
        self.rng = np.random.default_rng(rnd.getrandbits(32))
        self.dtype = rnd.choice(["float32", "float32", "bfloat16", "float16", "int8", "uint8"])
        self.ndim = rnd.choice([1, 2, 3, 4, 4])
        self.pool = rnd.sample([0, 1, 2, 3, 4, 5, 8, 16, 33], rnd.randint(1, 3))

    def size(self, least=0):
        return max(least, self.rnd.choice(self.pool))

    def array(self, typ):
        r = self.rnd
        declared_dtype, declared_ndim = spec_of(typ)
        good = r.random() < 0.85
        dtype = (declared_dtype or self.dtype) if good else r.choice(DTYPES)
        ndim = (declared_ndim if declared_ndim is not None else self.ndim) if good else r.randint(0, 4)
        shape = [r.choice(self.pool) for _ in range(ndim)]
        while np.prod(shape) > 50_000:   # keep every call cheap
            shape[shape.index(max(shape))] //= 4
        layout = "c" if good else r.choice(["c", "transposed", "stepped", "fortran"])
        fill = r.choice(["small", "small", "small", "huge", "nonfinite", "negative"])
        x = self.rng.standard_normal([s * 2 if layout == "stepped" and i == 0 else s for i, s in enumerate(shape)])
        if dtype in ("float32", "float64", "float16", "bfloat16"):
            x = {"huge": x * 1e30, "nonfinite": np.where(x > 0, np.inf, np.nan), "negative": -np.abs(x) - 1}.get(fill, x)
        elif dtype == "bool":
            x = x > 0
        else:   # indices and ids: mostly small and in range, sometimes negative or past any size
            x = {"huge": np.full(x.shape, 2 ** 31 - 1), "negative": np.full(x.shape, -1)}.get(fill, np.abs(x) * 3)
        if dtype == "bfloat16" or (r.random() < 0.5 and dtype not in ("uint32", "uint64")):
            t = torch.from_numpy(np.asarray(x, dtype=np.float64) if dtype != "bool" else np.asarray(x))
            t = t.to(getattr(torch, dtype if dtype != "bool" else "bool"))
            t = {"stepped": t[::2] if t.ndim else t, "transposed": t.transpose(-1, -2) if t.ndim >= 2 else t,
                 "fortran": t.t().contiguous().t() if t.ndim == 2 else t}.get(layout, t)
            if not good and r.random() < 0.3:   # another device: meta, or CUDA where there is one
                t = t.to(r.choice(DEVICES))
            return t
        with np.errstate(all="ignore"):
            a = np.asarray(x).astype(dtype)
        a = {"stepped": a[::2] if a.ndim else a, "transposed": a.swapaxes(-1, -2) if a.ndim >= 2 else a,
             "fortran": np.asfortranarray(a)}.get(layout, a)
        if not good and r.random() < 0.3:
            a.setflags(write=False)
        return a

    def value(self, name, typ):
        r = self.rnd
        if "| None" in typ and r.random() < 0.3:
            return None
        typ = typ.replace(" | None", "")
        if r.random() < 0.08:   # anything at all
            return r.choice([None, -1, 0, 3, 2.5, float("nan"), "x", [1, 2], b"\x00", object()])
        if typ.startswith("ndarray"):
            return self.array(typ)
        if typ == "float":
            return r.choice([1.0, 0.5, 0.125, 0.0, -1.0, 1e-40, 1e40, float("nan"), float("inf")])
        if typ == "int":
            return r.choice([1, 2, 4, 8, 16, 32, 64, 0, -1, 2 ** 31, 2 ** 32 + 1, 2 ** 63 - 1, -2 ** 63, 2 ** 64])
        if typ == "bool":
            return r.random() < 0.5
        if typ == "str":
            return TMP if name.endswith("_dir") else r.choice(WORDS)
        if typ == "list":
            return [r.choice(["a b c d e f", "", "é ü 東京", b"bytes too", 7, None]) for _ in range(r.randint(0, 4))]
        if typ.endswith("PackedWeight"):
            scheme, n, k = r.choice(["int4", "int8", "w8a8"]), r.choice(self.pool + [1]), r.choice([32, 64, 96])
            qt = quantize(torch.randn(max(n, 1), k), scheme, 32)
            return _C.PackedWeight(qt.scheme, qt.data, qt.scales, qt.zeros, qt.group_size)   # its arrays die here
        raise AssertionError(f"{name}: no strategy for parameter type {typ!r}; add one")


# Private by design, taking tensors' raw addresses (csrc/bindings/layer.cpp: importing a tensor costs 10-100x
# their work): no C++ code can check an address, so random ints would write anywhere. Their only caller,
# quark.ops.layer, checks every argument first; tests/test_ops_layer.py holds it to clear errors.
RAW_ADDRESS = {"_rmsnorm", "_rope_store"}


def targets():
    """(label, make_callable, param lists): module functions, constructors and methods of each class."""
    out = []
    for name in sorted(dir(_C)):
        obj = getattr(_C, name)
        if name.startswith("__") or name in RAW_ADDRESS:
            continue
        if isinstance(obj, type):
            out.append((name, lambda obj=obj: obj, [parse_params(s) for s in signatures(obj.__init__, "__init__")]))
            for m in sorted(dir(obj)):
                meth = getattr(obj, m)
                if not m.startswith("__") and callable(meth) and meth.__doc__ and "(" in meth.__doc__:
                    out.append((f"{name}.{m}", lambda obj=obj, m=m: getattr(instance(obj), m),
                                [parse_params(s) for s in signatures(meth, m)]))
        elif callable(obj):
            out.append((name, lambda obj=obj: obj, [parse_params(s) for s in signatures(obj, name)]))
    return out


def instance(cls):
    """A valid object to call methods on: a small index with a few rows, or a packed int4 weight."""
    if cls is _C.VectorIndex:
        idx = _C.VectorIndex(4, "l2", "hnsw", "sq8", 8, 20, 0, "memory", TMP)
        x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        idx.set_sq8_range(x.min(0), x.max(0))
        idx.add(x, np.arange(5, dtype=np.int64), True, np.empty(5, dtype=np.int64))
        return idx
    if cls is _C.PackedWeight:
        qt = quantize(torch.randn(4, 64), "int4", 32)
        return _C.PackedWeight(qt.scheme, qt.data, qt.scales, qt.zeros, qt.group_size)
    raise AssertionError(f"no valid instance of {cls.__name__} for the fuzzer; add one")


def valid_calls(d):
    """Well-formed arguments for the kernel bindings, sizes from the example's pool: the fuzzer corrupts
    one or two of them, so each check and each kernel is reached with exactly one thing wrong (or none)."""
    r = d.rnd
    B, S, N, K = d.size(1), d.size(1), d.size(1), r.choice([32, 64, 96])
    D, Hkv = r.choice([1, 4, 16, 33, 64, 128]), r.choice([1, 2])
    H = Hkv * r.choice([1, 2])
    dt = r.choice([torch.float32, torch.bfloat16])

    def t(*shape, dtype=torch.float32):
        return torch.randn(shape).to(dtype)

    def decode():
        smax = d.size(1)
        cache = r.choice([dt, torch.int8])
        kc, vc = (t(B, Hkv, smax, D, dtype=cache) if cache != torch.int8 else torch.randint(-127, 128, (B, Hkv, smax, D),
                  dtype=torch.int8) for _ in range(2))
        scales = [t(B, Hkv, smax).abs(), t(B, Hkv, smax).abs()] if cache == torch.int8 else [None, None]
        lens = torch.randint(1, smax + 1, (B,))
        return [t(B, H, D, dtype=dt), kc, vc, *scales, lens, t(B, H, D, dtype=dt), D ** -0.5]

    def packed():
        qt = quantize(torch.randn(N, K), r.choice(["int4", "int8", "w8a8"]), 32)
        return qt, [qt.scheme, qt.data, qt.scales, qt.zeros, qt.group_size]

    def restore():   # the state of a real index, as Index.load hands it back
        idx = instance(_C.VectorIndex)
        st_ = idx.state()
        rows = np.empty((st_["slots"], 4), dtype=np.float32)
        idx.read_rows(0, rows)
        return [st_["slots"], st_["next_id"], st_["entry"], st_["max_level"], rows, st_["codes"], st_["sq8_min"],
                st_["sq8_scale"], st_["ids"], st_["deleted"], st_["levels"], st_["links0"], st_["upper"], False, -1, -1, -1,
                -1]

    qt, pw = packed()
    n, k = d.size(1), d.size(1)
    return {
        "attention_forward": lambda: [t(B, H, S, D, dtype=dt), t(B, Hkv, S, D, dtype=dt), t(B, Hkv, S, D, dtype=dt),
                                      t(B, H, S, D, dtype=dt), torch.empty(B, H, S), D ** -0.5, r.random() < 0.5],
        "attention_backward": lambda: [t(B, H, S, D), t(B, Hkv, S, D), t(B, Hkv, S, D), t(B, H, S, D), t(B, H, S, D),
                                       t(B, H, S), t(B, H, S, D), t(B, Hkv, S, D), t(B, Hkv, S, D), D ** -0.5,
                                       r.random() < 0.5],
        "decode_attention": decode,
        "gemv_f32": lambda: [t(B, K), t(N, K), r.choice([None, t(N)]), t(B, N)],
        "gemv_bf16": lambda: [t(B, K, dtype=torch.bfloat16), t(N, K, dtype=torch.bfloat16),
                              r.choice([None, t(N, dtype=torch.bfloat16)]), t(B, N, dtype=torch.bfloat16)],
        "qlinear": lambda: [t(B, qt.packed_k, dtype=dt), _C.PackedWeight(*pw), r.choice([None, t(N)]), t(B, N, dtype=dt),
                            r.random() < 0.5],
        "PackedWeight": lambda: list(pw),
        "pairwise_distance": lambda: [t(n, D), t(k, D), t(n, k), r.choice(["l2", "ip", "cosine"])],
        "gather_distance": lambda: [r.choice(["l2", "ip"]), t(D),
                                    r.choice([t(n, D), torch.randint(0, 256, (n, D), dtype=torch.uint8)]),
                                    torch.randint(0, n, (k,)).to(torch.int32).numpy().astype(np.uint32), t(D).abs(),
                                    0.0, t(k)],
        "minhash": lambda: [[r.choice(["a b c d e f g", "", "é 東京 x", "word"]) for _ in range(n)],
                            np.zeros((n, 16), dtype=np.uint64), 16, r.choice([1, 2, 5]), r.choice(["word", "char"]),
                            r.randint(0, 2 ** 32)],
        "VectorIndex": lambda: [4, r.choice(["l2", "ip", "cosine"]), r.choice(["hnsw", "flat"]), r.choice(["fp32", "sq8"]),
                                r.choice([4, 8, 16]), r.choice([8, 40]), 0, r.choice(["memory", "file"]), TMP],
        "VectorIndex.add": lambda: [t(n, 4), torch.arange(100, 100 + n), r.random() < 0.5, torch.empty(n, dtype=torch.int64)],
        "VectorIndex.search": lambda: [t(n, 4), r.choice([1, 16]), r.choice([0, 4]), np.ones(16, dtype=np.uint8),
                                       r.random() < 0.5, t(n, k), torch.empty(n, k, dtype=torch.int64)],
        "VectorIndex.read_rows": lambda: [r.choice([0, 3, 5]), t(n, 4)],
        "VectorIndex.remove": lambda: [torch.arange(n) - 1],
        "VectorIndex.set_sq8_range": lambda: [t(4), t(4)],
        "VectorIndex.restore": restore,
    }


TARGETS = targets()


def test_every_binding_is_fuzzed():
    names = {label for label, _, _ in TARGETS}
    functions = {n for n in dir(_C) if not n.startswith("__") and callable(getattr(_C, n))} - RAW_ADDRESS
    assert functions <= names and len(names) > len(functions)   # the classes' methods too
    for label, _, sigs in TARGETS:
        assert sigs and all(isinstance(p, list) for p in sigs), label


@pytest.mark.parametrize("label,make,sigs", TARGETS, ids=[t[0] for t in TARGETS])
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@(seed(int(SEED)) if SEED not in (None, "random") else lambda test: test)   # a seed overrides derandomize
@given(rnd=st.randoms(use_true_random=True))
def test_binding_never_crashes(label, make, sigs, rnd):
    d = Draw(rnd)
    valid = valid_calls(d).get(label)
    params = rnd.choice(sigs)
    allowed = FD_ALLOWED if any(name == "fd" for name, _ in params) else ALLOWED
    if valid is not None and rnd.random() < 0.8:   # a valid call, zero, one or two arguments replaced
        args = valid()
        for i in rnd.sample(range(len(args)), min(len(args), rnd.choice([0, 1, 1, 2]))):
            args[i] = d.value(*params[i]) if len(params) == len(args) else d.value("x", "ndarray")
    else:
        args = [d.value(n, t) for n, t in params]
    if rnd.random() < 0.05:   # wrong arity
        args = args[:-1] if args and rnd.random() < 0.5 else args + [None]
    note(f"{label}({', '.join(describe(a) for a in args)})")
    state = {k: get() for k, get in STATEFUL.items()}
    try:
        fn = make()
        fn(*args)
        if isinstance(getattr(fn, "__self__", None), _C.VectorIndex):   # whatever a call accepted, search still works
            q = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
            fn.__self__.search(q, 16, 0, np.ones(1, dtype=np.uint8), False, np.empty((2, 3), np.float32),
                               np.empty((2, 3), np.int64))
    except allowed:
        pass
    finally:
        _C.set_isa(state["set_isa"])
        _C.set_num_threads(state["set_num_threads"])


def describe(a):
    if isinstance(a, (np.ndarray, torch.Tensor)):
        return f"{type(a).__name__}{tuple(a.shape)}:{a.dtype}:stride{a.stride() if isinstance(a, torch.Tensor) else a.strides}"
    return repr(a)[:60]
