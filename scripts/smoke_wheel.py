"""Smoke test of an installed Quark (the wheel, in a fresh virtual environment with no compiler on
PATH; .ci/wheel_check runs it): the package comes from site-packages with the version of its
metadata, `quark info` runs, one call of every kernel family agrees with its oracle in
quark.ops.reference on this CPU's dispatch path, a quark.search.Index survives save and load, and
`quark run finetune --plan` finds the shipped recipe (recipes/finetune.yaml, packaged as quark/recipes).
Run it from outside the source tree: python scripts/smoke_wheel.py"""
import importlib.metadata
import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
import torch

import quark
import quark.ops
import quark.search
from quark.ops import reference as ref

FAMILIES = {"attention", "distance", "gather_distance", "gemv_bf16", "gemv_f32", "quant", "minhash"}


def check(name, got, want, tol):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    if not err <= tol:
        sys.exit(f"FAIL {name}: error {err:.1e} > {tol:.0e}")


def main():
    compilers = [c for c in ("cc", "gcc", "g++", "c++", "clang", "nvcc") if shutil.which(c)]
    if compilers:
        sys.exit(f"FAIL the smoke test must run without a compiler on PATH; found {compilers}")
    site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
    where = pathlib.Path(quark.__file__).resolve()
    if site not in where.parents:
        sys.exit(f"FAIL quark imported from {where}, not from the installed wheel in {site}")
    if importlib.metadata.version("quark") != quark.__version__:
        sys.exit(f"FAIL metadata version {importlib.metadata.version('quark')} != quark.__version__ {quark.__version__}")

    info = json.loads(subprocess.run(["quark", "info", "--json"], check=True, capture_output=True, text=True).stdout)
    paths = info["kernel_paths"]
    if set(paths) != FAMILIES or info["version"] != quark.__version__:
        sys.exit(f"FAIL quark info: version {info['version']}, kernel families {sorted(paths)}")
    print(f"quark {info['version']} on {info['machine']}: isa {info['isa']}, "
          + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())))

    g = torch.Generator().manual_seed(0)
    # attention: forward and backward (GQA, causal, odd sizes), decode over an int8 cache
    q = torch.randn(2, 4, 13, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 13, 32, generator=g, requires_grad=True) for _ in range(2))
    out = quark.ops.attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.attention(qd, kd, vd, causal=True)
    check("attention", out, want, 1e-5)
    for got, w in zip(grads, torch.autograd.grad(want.square().sum(), (qd, kd, vd))):
        check("attention backward", got, w, 1e-4)
    kc, vc = torch.randn(2, 2, 9, 32, generator=g), torch.randn(2, 2, 9, 32, generator=g)
    (kq, ks), (vq, vs) = quark.ops.quantize_kv(kc), quark.ops.quantize_kv(vc)
    qt, lens = torch.randn(2, 4, 32, generator=g), torch.tensor([9, 4])
    check("decode_attention", quark.ops.decode_attention(qt, kq, vq, lens, k_scale=ks, v_scale=vs),
          ref.decode_attention(qt.double(), kq, vq, lens, k_scale=ks, v_scale=vs), 1e-5)
    # quant, gemv_f32 and gemv_bf16: int4 / int8 / w8a8 linear layers and the fp32 and bf16 GEMVs
    x, w, b = torch.randn(3, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    for scheme in ("int4", "int8", "w8a8"):
        qw = quark.ops.quantize(w, scheme)
        check(f"qlinear {scheme}", quark.ops.qlinear(x, qw, b), ref.qlinear(x.double(), qw, b.double()), 1e-5)
    check("linear", quark.ops.linear(x, w, b), ref.linear(x.double(), w.double(), b.double()), 1e-5)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()   # gemv_bf16: fp32 sums rounded once to bf16
    check("linear bf16", quark.ops.linear(xb, wb, bb), ref.linear(xb.double(), wb.double(), bb.double()), 2e-2)
    # distance: every metric
    xs, ys = np.random.default_rng(0).standard_normal((2, 7, 33)).astype(np.float32)
    for metric in ("l2", "ip", "cosine"):
        check(f"distance {metric}", quark.ops.pairwise_distance(xs, ys, metric),
              ref.pairwise_distance(xs.astype(np.float64), ys.astype(np.float64), metric), 1e-5)
    # minhash: bit-exact
    texts = ["the quick brown fox jumps over the lazy dog", "the quick brown fox jumps over a lazy cat", ""]
    if not np.array_equal(quark.ops.minhash(texts, num_perm=64, ngram=3), ref.minhash(texts, num_perm=64, ngram=3)):
        sys.exit("FAIL minhash differs from the reference")

    # quark.search.Index: flat search is exact; hnsw answers the same after save and load
    rng = np.random.default_rng(1)
    base, queries = rng.standard_normal((300, 24), dtype=np.float32), rng.standard_normal((5, 24), dtype=np.float32)
    flat = quark.search.Index(24, kind="flat")
    flat.add(base)
    _, ids = flat.search(queries, k=4)
    if not np.array_equal(ids, np.argsort(ref.pairwise_distance(queries, base), axis=1)[:, :4]):
        sys.exit("FAIL flat Index search is not the exact nearest neighbours")
    index = quark.search.Index(24, kind="hnsw", storage="sq8")
    index.add(base)
    before = index.search(queries, k=4)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(f"{tmp}/index.qidx")
        after = quark.search.Index.load(f"{tmp}/index.qidx").search(queries, k=4)
    if not all(np.array_equal(x, y) for x, y in zip(before, after)):
        sys.exit("FAIL hnsw Index answers differently after save/load")
    # the shipped recipes by name, from a directory without recipes/: planned on a tiny base model
    from quark.model import GPT, preset
    from quark.model.io import save_model
    with tempfile.TemporaryDirectory() as tmp:
        save_model(GPT(preset("nano", vocab_size=256, n_layer=1, d_model=32, n_head=2, n_kv_head=1)), f"{tmp}/base")
        r = subprocess.run(["quark", "run", "finetune", "--plan", "--base-model", f"{tmp}/base", "--run-dir",
                            f"{tmp}/run"], capture_output=True, text=True, cwd=tmp)
    if r.returncode != 0 or "recipe finetune" not in r.stdout or "sft" not in r.stdout:
        sys.exit(f"FAIL quark run finetune --plan: {r.stdout[-500:]}{r.stderr[-500:]}")
    print("smoke test OK: attention, decode_attention, qlinear int4/int8/w8a8, linear fp32/bf16, distance, minhash, "
          "Index (flat exact; hnsw sq8 save/load), quark run finetune --plan")


if __name__ == "__main__":
    main()
