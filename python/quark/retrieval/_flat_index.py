"""Exact inner-product index with the quark.search.Index API, used until quark.search is merged."""
import json

import numpy as np

from quark.ops import pairwise_distance


class FlatIndex:
    def __init__(self, dim, metric="ip", kind="flat", storage="fp32"):
        if metric != "ip":
            raise ValueError("FlatIndex supports metric='ip' only")
        self.dim, self.metric, self.kind = dim, metric, kind
        self.vecs = np.zeros((0, dim), np.float32)
        self.ids = np.zeros(0, np.int64)

    def __len__(self):
        return len(self.ids)

    def add(self, vectors, ids):
        self.vecs = np.concatenate([self.vecs, np.asarray(vectors, np.float32)])
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])

    def remove(self, ids):
        keep = ~np.isin(self.ids, np.asarray(ids, np.int64))
        self.vecs, self.ids = self.vecs[keep], self.ids[keep]

    def search(self, queries, k, filter=None):
        d = pairwise_distance(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(self.vecs), "ip")
        k = min(k, len(self.ids))
        top = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, top, 1), self.ids[top]

    def save(self, path):
        with open(path, "wb") as f:
            np.savez(f, vecs=self.vecs, ids=self.ids, meta=np.frombuffer(json.dumps([self.dim]).encode(), np.uint8))

    @classmethod
    def load(cls, path):
        z = np.load(path)
        idx = cls(int(json.loads(z["meta"].tobytes())[0]))
        idx.vecs, idx.ids = z["vecs"], z["ids"]
        return idx
