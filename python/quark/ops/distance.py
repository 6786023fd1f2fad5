"""Pairwise distances between a query batch and a base matrix: the kernel under vector search."""
from quark import _C
from quark.ops import reference
from quark.ops import triton as triton_ops
from quark.ops._checks import check_array, device_of, empty_like_kind, same_kind

METRICS = ("l2", "ip", "cosine")


def pairwise_distance(x, y, metric="l2"):
    """out[i, j] = distance(x[i], y[j]); x (nq, d), y (nb, d) float32 -> (nq, nb) float32.

    Metrics, smaller is nearer: "l2" squared Euclidean, "ip" negative inner product,
    "cosine" 1 - cosine similarity (a zero vector is at distance 1). numpy in -> numpy out,
    torch in -> torch out. CPU inputs run the C++ kernel, CUDA tensors the Triton kernel in
    quark.ops.triton.distance; other devices use quark.ops.reference.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_array("x", x, ("float32",), ndim=2)
    check_array("y", y, ("float32",), ndim=2)
    same_kind("y", y, "x", x)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dim: x is {tuple(x.shape)}, y is {tuple(y.shape)}")
    if device_of(x) == "cuda" and triton_ops.available():
        from quark.ops.triton.distance import pairwise_distance as distance_triton
        return distance_triton(x, y, metric)
    if device_of(x) != "cpu":
        return reference.pairwise_distance(x, y, metric)
    out = empty_like_kind(x, (x.shape[0], y.shape[0]))
    _C.pairwise_distance(x, y, out, metric)
    return out
