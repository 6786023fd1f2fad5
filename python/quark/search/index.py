"""Vector search index over caller-chosen int64 ids: exact ("flat") or graph ("hnsw"), fp32 or sq8.

    index = Index(384, metric="cosine")               # kind="hnsw", storage="fp32"
    ids = index.add(vectors)                           # float32 (n, 384); or add(vectors, ids=my_ids)
    dist, ids = index.search(queries, k=10)            # (nq, 10) each, nearest first
    dist, ids = index.search(queries, k=10, filter=allowed_ids)
    index.remove([3, 7]); index.compact()
    index.save("kb.qsi"); index = Index.load("kb.qsi", mmap=True)
    small = Index(384, storage="sq8", rows="file")     # int8 codes + graph in memory, fp32 rows in a file

Distances follow quark.ops.pairwise_distance, smaller is nearer: "l2" squared Euclidean, "ip" -dot,
"cosine" 1 - cosine similarity. Rows of the result past the available matches (k > len(index), or a
filter that allows fewer than k) hold id -1 and distance +inf.

The engine is C++ (csrc/search/index.h): flat search runs the blocked pairwise_distance kernel with
a top-k heap; hnsw is an HNSW graph built in parallel and searched with SIMD gather distances, on
int8 codes for storage="sq8" (build and search; the best candidates are re-ranked with exact fp32
distances). Searches may run from many threads while one thread adds; add/remove/compact/save
serialise on a lock.

Where the fp32 rows of a sq8 index live (`rows`): "memory" (default), or "file": only the codes
(1 byte per dimension instead of 4) and the graph stay in memory, and the final re-rank reads the
fp32 rows of the `rerank` best candidates back with pread (DiskANN's split; csrc/search/row_file.h).
Rows added since the index was created or loaded go to an unlinked scratch file in `rows_dir`
(default: the temp directory; put it on a disk, not a tmpfs, or the rows are in memory after all);
after Index.load(path, rows="file") the rows of the saved file are read from that file. The page
cache keeps the rows it has read (reclaimable, not resident index memory); a cold cache costs one
device read per re-ranked candidate, issued in parallel (POSIX_FADV_WILLNEED) for each query.

File format (save/load), little-endian:
    0   8 bytes  magic b"QKSEARCH"
    8   u32      format version (FORMAT_VERSION)
    12  u32      header length H
    16  u32      CRC-32 of the header
    20  u32      reserved (0)
    24  H bytes  header: JSON with the settings, the scalars and a table of sections
                 {name, dtype, shape, offset, nbytes, crc32} and the data size
    then     the data area, from the next multiple of 64 bytes: the sections at their offsets
             (relative to the data area, multiples of 64, so mapped sections are aligned).
The file is written to a temporary file, fsynced and renamed (quark.io.atomic_open), so a crash
leaves the old file or the new one. load() checks magic, version, size and every checksum before
building anything, and names what is wrong.
"""
import json
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np

from quark import _C
from quark.io import atomic_open

METRICS = ("l2", "ip", "cosine")
KINDS = ("flat", "hnsw")
STORAGES = ("fp32", "sq8")
ROWS = ("memory", "file")
MAGIC = b"QKSEARCH"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, reserved
_ALIGN = 64
_LARGE = ("vectors", "codes", "links0")  # sections load() reads (or maps) straight into the engine


class IndexFileError(ValueError):
    """A saved index that cannot be loaded: not an index file, another format version, truncated or corrupted."""


def _as_numpy(name, a):
    try:
        import torch
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                raise ValueError(f"{name} is on {a.device.type}; move it to the CPU first ({name}.cpu())")
            return a.detach().numpy()
    except ImportError:
        pass
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    return a


def _matrix(name, a, dim):
    """A float32 C-contiguous (n, dim) view of a (n, dim) or (dim,) input; errors name the argument."""
    a = _as_numpy(name, a)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {a.dtype}; convert it first ({name}.astype(np.float32))")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}) for this index of dim {dim}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name})")
    return a


class Index:
    """A vector index; see the module docstring. `ef_search` is the HNSW candidate-list size at
    search time (recall vs speed; raised to k when smaller); `seed` fixes the level draws.
    `rerank` (sq8): how many of the best candidates by code distance get their exact fp32 distance,
    at least k; None: all ef candidates with rows in memory, 2k (at least k + 8) with rows in a file."""

    def __init__(self, dim, metric="l2", kind="hnsw", storage="fp32", M=16, ef_construction=200, ef_search=64,
                 seed=0, rows="memory", rows_dir=None, rerank=None):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        if kind == "flat" and storage != "fp32":
            raise ValueError("kind='flat' is exact search over fp32 rows; use storage='fp32' (or kind='hnsw' for sq8)")
        if not isinstance(M, (int, np.integer)) or not 2 <= M <= 128:
            raise ValueError(f"M must be an integer in [2, 128], got {M!r}")
        if not isinstance(ef_construction, (int, np.integer)) or ef_construction < 1:
            raise ValueError(f"ef_construction must be a positive integer, got {ef_construction!r}")
        if rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
        if rows == "file" and storage != "sq8":
            raise ValueError("rows='file' needs storage='sq8': the graph runs on the in-memory int8 codes and only "
                             "the final re-rank reads fp32 rows from the file")
        if rows_dir is not None and not os.path.isdir(rows_dir):
            raise ValueError(f"rows_dir must be an existing directory, got {rows_dir!r}")
        self.dim, self.metric, self.kind, self.storage = int(dim), metric, kind, storage
        self.M, self.ef_construction, self.seed = int(M), int(ef_construction), int(seed)
        self.rows, self.rows_dir = rows, str(rows_dir if rows_dir is not None else tempfile.gettempdir())
        self.ef_search = ef_search
        self.rerank = rerank
        self._impl = self._new_impl()
        self._lock = threading.RLock()  # add / remove / compact / save; searches do not take it
        self._slot_ids = np.empty(0, np.int64)
        self._mapped = None  # the np.memmap sections a load(mmap=True) index reads from

    def _new_impl(self):
        return _C.VectorIndex(self.dim, self.metric, self.kind, self.storage, self.M, self.ef_construction,
                              self.seed, self.rows, self.rows_dir)

    @property
    def ef_search(self):
        return self._ef_search

    @ef_search.setter
    def ef_search(self, ef):
        if not isinstance(ef, (int, np.integer)) or ef < 1:
            raise ValueError(f"ef_search must be a positive integer, got {ef!r}")
        self._ef_search = int(ef)

    @property
    def rerank(self):
        return self._rerank

    @rerank.setter
    def rerank(self, r):
        self._rerank = _check_rerank(r)

    def __len__(self):
        return len(self._impl)

    def __repr__(self):
        return (f"Index(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}, storage={self.storage!r}, "
                f"M={self.M}, ef_construction={self.ef_construction}, ef_search={self.ef_search}, len={len(self)})")

    def memory_bytes(self):
        """Bytes the index holds in memory: fp32 rows (unless rows="file"), codes, graph, ids, tombstones,
        id map and pooled search scratch, each array at its allocated capacity (it grows by 1.5x).
        The page cache of a rows="file" index's rows is not counted: the kernel may reclaim it."""
        return self._impl.memory_bytes()

    def add(self, vectors, ids=None):
        """Add float32 rows (n, dim) (or one row (dim,)). ids: n distinct int64 not in the index, or
        None to assign increasing ids after the largest used so far. Returns the ids (int64, (n,)).
        Non-finite values, a dim mismatch or a repeated id raise ValueError and add nothing."""
        x = _matrix("vectors", vectors, self.dim)
        n = x.shape[0]
        if ids is None:
            ids_in = np.empty(0, np.int64)
        else:
            ids_in = np.asarray(_as_numpy("ids", ids) if not isinstance(ids, (list, tuple, range)) else ids)
            if ids_in.ndim != 1 or ids_in.shape[0] != n:
                raise ValueError(f"ids must be 1-D with one id per vector ({n}), got shape {ids_in.shape}")
            if n and not np.issubdtype(ids_in.dtype, np.integer):
                raise TypeError(f"ids must be integers (int64), got dtype {ids_in.dtype}")
            ids_in = np.ascontiguousarray(ids_in, dtype=np.int64)
        out = np.empty(n, np.int64)
        with self._lock:
            self._impl.add(x, ids_in, ids is None, out)
        return out

    def remove(self, ids):
        """Remove ids (tombstones: never returned again; the graph keeps them for navigation until
        compact()). Unknown or already removed ids are skipped. Returns how many were removed."""
        ids = np.ascontiguousarray(np.atleast_1d(np.asarray(ids)), dtype=np.int64)
        with self._lock:
            return int(self._impl.remove(ids))

    def compact(self):
        """Rebuild without removed rows (and refit sq8 ranges on the live rows). Assigned ids keep
        counting from where they were. The rows go through in chunks, so with rows="file" they are
        never all in memory at once."""
        with self._lock:
            st = self._impl.state()
            live = st["deleted"] == 0
            fresh = self._new_impl()
            if self.storage == "sq8" and live.any():
                lo = np.full(self.dim, np.inf, np.float32)
                hi = np.full(self.dim, -np.inf, np.float32)
                for first, rows in self._row_chunks(st["slots"]):
                    kept = rows[live[first:first + len(rows)]]
                    if len(kept):
                        lo, hi = np.minimum(lo, kept.min(0)), np.maximum(hi, kept.max(0))
                fresh.set_sq8_range(lo, hi)
            for first, rows in self._row_chunks(st["slots"]):
                keep = live[first:first + len(rows)]
                kept = np.ascontiguousarray(rows[keep])
                fresh.add(kept, np.ascontiguousarray(st["ids"][first:first + len(rows)][keep]), False,
                          np.empty(len(kept), np.int64))
            fresh.reserve_ids(st["next_id"])
            self._impl, self._mapped, self._slot_ids = fresh, None, np.empty(0, np.int64)

    def _row_chunks(self, slots):
        """(first row, float32 (m, dim) rows) over the stored rows of the current engine, through one
        reused buffer of ~8 MiB."""
        chunk = max(1, (8 << 20) // (4 * self.dim))
        buf = np.empty((min(chunk, max(slots, 1)), self.dim), np.float32)
        for first in range(0, slots, chunk):
            rows = buf[:min(chunk, slots - first)]
            self._impl.read_rows(first, rows)
            yield first, rows

    def _rerank_depth(self, rerank, k):
        """The engine's re-rank depth: candidates given exact distances (sq8), 0 for all of them."""
        r = self.rerank if rerank is None else _check_rerank(rerank)
        if r is None:
            # In memory, re-ranking all ef candidates costs little. From the file each one is a
            # pread (~1 us warm); code distances rarely misorder by more than a few ranks
            # (k + 2..5 re-ranked gave the full recall on the benchmark data), so 2k, at least k + 8.
            return max(2 * k, k + 8) if self.rows == "file" else 0
        return r

    def _allow_mask(self, impl, filter):
        """One byte per stored row of `impl`: 1 where the row's id passes `filter`."""
        slot_ids = self._slot_ids
        if len(slot_ids) != impl.slots:
            slot_ids = impl.slot_ids()
            if impl is self._impl:
                self._slot_ids = slot_ids
        if callable(filter):
            keep = np.asarray(filter(slot_ids))
            if keep.shape != slot_ids.shape or keep.dtype != np.bool_:
                raise ValueError("a callable filter must map an int64 id array to a bool array of the same shape, "
                                 f"got {keep.dtype} {keep.shape} for {slot_ids.shape}")
        else:
            f = np.asarray(_as_numpy("filter", filter) if not isinstance(filter, (list, tuple, set, frozenset, range))
                           else list(filter))
            if f.dtype == np.bool_:  # a bitset indexed by id
                if f.ndim != 1:
                    raise ValueError(f"a bool filter must be 1-D (mask[id] = allowed), got shape {f.shape}")
                inside = (slot_ids >= 0) & (slot_ids < len(f))
                keep = np.zeros(len(slot_ids), bool)
                keep[inside] = f[slot_ids[inside]]
            elif f.size == 0 or np.issubdtype(f.dtype, np.integer):
                keep = np.isin(slot_ids, f.astype(np.int64).ravel())
            else:
                raise TypeError("filter must be a collection of int ids, a bool mask indexed by id, or a callable "
                                f"ids -> bool mask; got an array of {f.dtype}")
        return np.ascontiguousarray(keep, dtype=np.uint8)

    def search(self, queries, k=10, filter=None, ef=None, rerank=None):
        """k nearest rows for each query (float32 (nq, dim), or one (dim,)) -> (distances float32,
        ids int64), each (nq, k) (or (k,) for one query), nearest first.

        filter restricts results to allowed ids: a collection of ids, a bool array `mask` (id i is
        allowed when i < len(mask) and mask[i]), or a callable mapping an int64 id array to a bool
        array. A selective filter switches to a scan of the allowed rows, so recall holds.
        ef and rerank override ef_search and the index's rerank for this call."""
        single = getattr(queries, "ndim", 2) == 1
        q = _matrix("queries", queries, self.dim)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        ef = self.ef_search if ef is None else ef
        if not isinstance(ef, (int, np.integer)) or ef < 1:
            raise ValueError(f"ef must be a positive integer, got {ef!r}")
        rerank = self._rerank_depth(rerank, int(k))
        impl = self._impl  # compact() may swap it meanwhile; this search finishes on the one it started with
        allow = np.empty(0, np.uint8) if filter is None else self._allow_mask(impl, filter)
        dist = np.empty((q.shape[0], int(k)), np.float32)
        ids = np.empty((q.shape[0], int(k)), np.int64)
        impl.search(q, int(ef), rerank, allow, filter is not None, dist, ids)
        return (dist[0], ids[0]) if single else (dist, ids)

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path):
        """Write the index to `path` atomically (temp file, fsync, rename): versioned, checksummed.
        The fp32 rows are streamed in chunks (from memory or from their file), never copied whole."""
        with self._lock:  # no add/remove/compact meanwhile; searches go on
            st = self._impl.state()
            n = int(st["slots"])
            header = {"format": "quark.search.Index", "dim": self.dim, "metric": self.metric, "kind": self.kind,
                      "storage": self.storage, "M": self.M, "ef_construction": self.ef_construction,
                      "ef_search": self.ef_search, "seed": self.seed, "rows": self.rows, "rerank": self.rerank,
                      "slots": n, "next_id": int(st["next_id"]),
                      "entry": int(st.get("entry", -1)), "max_level": int(st.get("max_level", -1)), "sections": []}
            arrays = {k: v for k, v in st.items() if isinstance(v, np.ndarray)}
            vectors_crc = 0  # a first pass over the rows for the checksum the header carries
            for _, rows in self._row_chunks(n):
                vectors_crc = zlib.crc32(_raw(rows), vectors_crc)
            sections = [("vectors", np.dtype(np.float32), (n, self.dim), n * self.dim * 4, vectors_crc)]
            sections += [(name, a.dtype, a.shape, a.nbytes, zlib.crc32(_raw(a))) for name, a in arrays.items()]
            offset = 0  # sections are placed relative to the data area, which starts after the header
            for name, dtype, shape, nbytes, crc in sections:
                header["sections"].append({"name": name, "dtype": dtype.str, "shape": list(shape), "offset": offset,
                                           "nbytes": nbytes, "crc32": crc})
                offset = _round_up(offset + nbytes, _ALIGN)
            header["data_size"] = offset
            hbytes = json.dumps(header).encode()
            data_start = _round_up(_PREFIX.size + len(hbytes), _ALIGN)
            with atomic_open(path, "wb") as f:
                f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes), zlib.crc32(hbytes), 0))
                f.write(hbytes)
                f.write(b"\0" * (data_start - _PREFIX.size - len(hbytes)))
                for name, _, _, nbytes, _ in sections:
                    if name == "vectors":
                        for _, rows in self._row_chunks(n):
                            f.write(_raw(rows))
                    else:
                        f.write(_raw(arrays[name]))
                    f.write(b"\0" * (_round_up(nbytes, _ALIGN) - nbytes))

    @classmethod
    def load(cls, path, mmap=False, rows=None, rows_dir=None):
        """Read an index written by save().

        The large sections (fp32 rows, codes, level-0 links) go from the file straight into the
        index's own memory, without an intermediate copy. mmap=True maps them from the file
        read-only instead (they become an in-memory copy at the next add). rows: "memory" or "file"
        (default: as saved); with "file" the fp32 rows stay in this file and are read back with
        pread for the re-rank (the file must not be modified in place while the index is open;
        replacing it, as save() does, is fine), and rows added later go to a scratch file in rows_dir.
        Raises IndexFileError naming the problem for a file that is not an index, has another format
        version, is truncated or fails a checksum."""
        path = Path(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise IndexFileError(f"{path}: too short to be a quark.search index ({size} bytes)")
            magic, version, hlen, hcrc, _ = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise IndexFileError(f"{path}: not a quark.search index file (magic {magic!r}, expected {MAGIC!r})")
            if version != FORMAT_VERSION:
                raise IndexFileError(f"{path}: index format version {version}; this quark reads version "
                                     f"{FORMAT_VERSION} only (re-save it with the quark that wrote it, or rebuild)")
            hbytes = f.read(hlen)
            if len(hbytes) < hlen:
                raise IndexFileError(f"{path}: truncated inside the header ({size} bytes)")
            if zlib.crc32(hbytes) != hcrc:
                raise IndexFileError(f"{path}: header checksum mismatch: the file is corrupted")
            h = json.loads(hbytes)
            rows = h.get("rows", "memory") if rows is None else rows
            index = cls(h["dim"], metric=h["metric"], kind=h["kind"], storage=h["storage"], M=h["M"],
                        ef_construction=h["ef_construction"], ef_search=h["ef_search"], seed=h["seed"], rows=rows,
                        rows_dir=rows_dir, rerank=h.get("rerank"))
            d, n = index.dim, h["slots"]
            data_start = _round_up(_PREFIX.size + hlen, _ALIGN)
            expected = data_start + h["data_size"]
            if size < expected:
                raise IndexFileError(f"{path}: truncated: {size} bytes, the header says {expected}")
            if size > expected:
                raise IndexFileError(f"{path}: {size - expected} unexpected bytes after the end of the index")
            # Every section's checksum is verified before anything is built. The large ones are
            # checked through a small reused buffer and then read (or mapped) by the engine.
            arrays, offsets = {}, {}
            for sec in h["sections"]:
                shape, dtype = tuple(sec["shape"]), np.dtype(sec["dtype"])
                f.seek(data_start + sec["offset"])
                if sec["name"] in _LARGE:
                    crc = _crc_stream(f, sec["nbytes"])
                    if mmap and sec["nbytes"] > 0 and not (sec["name"] == "vectors" and rows == "file"):
                        arrays[sec["name"]] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + sec["offset"],
                                                        shape=shape)
                    else:
                        offsets[sec["name"]] = data_start + sec["offset"]
                else:
                    arrays[sec["name"]] = np.frombuffer(f.read(sec["nbytes"]), dtype=dtype).reshape(shape)
                    crc = zlib.crc32(_raw(arrays[sec["name"]]))
                if crc != sec["crc32"]:
                    raise IndexFileError(f"{path}: section {sec['name']!r} checksum mismatch: the file is corrupted")
            shapes = {s["name"]: (tuple(s["shape"]), s["dtype"]) for s in h["sections"]}
            want = {"vectors": ((n, d), "<f4"), "ids": ((n,), "<i8"), "deleted": ((n,), "|u1")}
            if index.storage == "sq8":
                want.update(codes=((n, d), "|u1"), sq8_min=((d,), "<f4"), sq8_scale=((d,), "<f4"))
            if index.kind == "hnsw":
                want.update(levels=((n,), "|i1"), links0=((n, 2 * index.M + 1), "<u4"))
            for name, spec in want.items():
                if shapes.get(name) != spec:
                    raise IndexFileError(f"{path}: inconsistent index contents: section {name!r} is "
                                         f"{shapes.get(name, 'missing')}, expected (shape, dtype) {spec}")
            empty = {"vectors": np.empty((0, d), np.float32), "codes": np.empty((0, d), np.uint8),
                     "sq8_min": np.empty(0, np.float32), "sq8_scale": np.empty(0, np.float32),
                     "levels": np.empty(0, np.int8), "links0": np.empty((0, 2 * index.M + 1), np.uint32),
                     "upper": np.empty(0, np.uint32)}
            get = {name: arrays.get(name, default) for name, default in empty.items()}
            try:
                index._impl.restore(n, h["next_id"], h["entry"] if h["entry"] >= 0 else 0xFFFFFFFF, h["max_level"],
                                    get["vectors"], get["codes"], get["sq8_min"], get["sq8_scale"], arrays["ids"],
                                    arrays["deleted"], get["levels"], get["links0"], get["upper"], bool(mmap),
                                    f.fileno(), offsets.get("vectors", -1), offsets.get("codes", -1),
                                    offsets.get("links0", -1))
            except (ValueError, KeyError) as e:
                raise IndexFileError(f"{path}: inconsistent index contents: {e}") from None
        index._mapped = {k: a for k, a in arrays.items() if isinstance(a, np.memmap)} or None
        return index


def _check_rerank(r):
    if r is not None and (not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1):
        raise ValueError(f"rerank must be None or a positive integer, got {r!r}")
    return None if r is None else int(r)


def _raw(a):
    """The bytes of a C-contiguous array without copying (memoryview refuses to cast empty shapes)."""
    return memoryview(a).cast("B") if a.size else b""


def _crc_stream(f, nbytes, chunk=1 << 20):
    """CRC-32 of the next nbytes of f, read through one reused buffer (no large allocation)."""
    crc, buf = 0, memoryview(bytearray(min(chunk, max(nbytes, 1))))
    while nbytes > 0:
        got = f.readinto(buf[:min(len(buf), nbytes)])
        if not got:
            break
        crc = zlib.crc32(buf[:got], crc)
        nbytes -= got
    return crc


def _round_up(x, a):
    return (x + a - 1) // a * a
