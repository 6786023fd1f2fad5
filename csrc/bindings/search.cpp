// quark._C.VectorIndex (csrc/search/index.h) and the gather_distance kernel, for quark.search.
// The Python layer (python/quark/search/index.py) checks arguments first and allocates outputs;
// the checks here only keep direct callers from crashing.
#include <nanobind/stl/string.h>

#include <climits>
#include <vector>

#include "bindings/common.h"
#include "search/gather_distance.h"
#include "search/index.h"

namespace quark::py {

template <class T>
using Vec = CArray<const T, nb::ndim<1>>;
template <class T>
using Mat = CArray<const T, nb::ndim<2>>;

template <class T>
static nb::ndarray<nb::numpy, T> numpy_copy(const T* src, std::initializer_list<size_t> shape) {
  size_t n = 1;
  for (size_t s : shape) n *= s;
  T* p = new T[n ? n : 1];
  if (n) std::memcpy(p, src, n * sizeof(T));
  nb::capsule owner(p, [](void* q) noexcept { delete[] static_cast<T*>(q); });
  return nb::ndarray<nb::numpy, T>(p, shape, owner);
}

static Metric parse_metric(const std::string& s) {
  if (s == "l2") return Metric::l2;
  if (s == "ip") return Metric::ip;
  if (s == "cosine") return Metric::cosine;
  value_error("metric must be 'l2', 'ip' or 'cosine'; got '" + s + "'");
}

void bind_search(nb::module_& m) {
  nb::class_<VectorIndex>(m, "VectorIndex", "C++ engine of quark.search.Index (use that class)")
      .def(
          "__init__",
          [](VectorIndex* self, int64_t dim, const std::string& metric, const std::string& kind,
             const std::string& storage, int M, int ef_construction, uint64_t seed, const std::string& rows,
             const std::string& rows_dir) {
            IndexConfig c;
            c.dim = dim;
            c.metric = parse_metric(metric);
            if (kind != "flat" && kind != "hnsw") value_error("kind must be 'flat' or 'hnsw'; got '" + kind + "'");
            c.kind = kind == "flat" ? IndexKind::flat : IndexKind::hnsw;
            if (storage != "fp32" && storage != "sq8")
              value_error("storage must be 'fp32' or 'sq8'; got '" + storage + "'");
            c.storage = storage == "sq8" ? Storage::sq8 : Storage::fp32;
            c.M = M;
            c.ef_construction = ef_construction;
            c.seed = seed;
            if (rows != "memory" && rows != "file") value_error("rows must be 'memory' or 'file'; got '" + rows + "'");
            c.rows_in_file = rows == "file";
            c.rows_dir = rows_dir;
            new (self) VectorIndex(c);
          },
          nb::arg("dim"), nb::arg("metric"), nb::arg("kind"), nb::arg("storage"), nb::arg("M"),
          nb::arg("ef_construction"), nb::arg("seed"), nb::arg("rows"), nb::arg("rows_dir"))
      .def("__len__", &VectorIndex::size)
      .def_prop_ro("slots", &VectorIndex::slots)
      .def_prop_ro("next_id", &VectorIndex::next_id)
      .def(
          "add",
          [](VectorIndex& ix, Mat<float> x, Vec<int64_t> ids, bool assign, CArray<int64_t, nb::ndim<1>> ids_out) {
            check(x.shape(1) == (size_t)ix.config().dim, "vectors must have shape (n, dim)");
            check(ids_out.shape(0) == x.shape(0), "ids_out must have length n");
            check(assign || ids.shape(0) == x.shape(0), "ids must have length n");
            nb::gil_scoped_release release;
            ix.add(x.data(), (int64_t)x.shape(0), assign ? nullptr : ids.data(), ids_out.data());
          },
          nb::arg("x").noconvert(), nb::arg("ids").noconvert(), nb::arg("assign"), nb::arg("ids_out").noconvert())
      .def(
          "remove",
          [](VectorIndex& ix, Vec<int64_t> ids) {
            nb::gil_scoped_release release;
            return ix.remove(ids.data(), (int64_t)ids.shape(0));
          },
          nb::arg("ids").noconvert())
      .def(
          "search",
          [](VectorIndex& ix, Mat<float> q, int ef, int rerank, Vec<uint8_t> allow, bool use_allow,
             CArray<float, nb::ndim<2>> dist, CArray<int64_t, nb::ndim<2>> ids) {
            check(q.shape(1) == (size_t)ix.config().dim, "queries must have shape (nq, dim)");
            check(dist.shape(0) == q.shape(0) && ids.shape(0) == q.shape(0) && dist.shape(1) == ids.shape(1),
                  "dist and ids must have shape (nq, k)");
            nb::gil_scoped_release release;
            ix.search(q.data(), (int64_t)q.shape(0), (int64_t)dist.shape(1), ef, rerank,
                      use_allow ? allow.data() : nullptr, (int64_t)allow.shape(0), dist.data(), ids.data());
          },
          nb::arg("q").noconvert(), nb::arg("ef"), nb::arg("rerank"), nb::arg("allow").noconvert(),
          nb::arg("use_allow"),
          nb::arg("dist").noconvert(), nb::arg("ids").noconvert())
      .def("memory_bytes", &VectorIndex::memory_bytes)
      .def("reserve_ids", &VectorIndex::reserve_ids, nb::arg("next"))
      .def(
          "set_sq8_range",
          [](VectorIndex& ix, Vec<float> lo, Vec<float> hi) {
            check(ix.config().storage == Storage::sq8, "set_sq8_range needs storage='sq8'");
            const size_t d = ix.config().dim;
            check(lo.shape(0) == d && hi.shape(0) == d, "lo and hi must have length dim");
            ix.set_sq8_range(lo.data(), hi.data());
          },
          nb::arg("lo").noconvert(), nb::arg("hi").noconvert())
      .def(
          "read_rows",
          [](const VectorIndex& ix, int64_t first, CArray<float, nb::ndim<2>> out) {
            check(out.shape(1) == (size_t)ix.config().dim, "out must have shape (n, dim)");
            nb::gil_scoped_release release;
            ix.read_rows(first, (int64_t)out.shape(0), out.data());
          },
          nb::arg("first"), nb::arg("out").noconvert(),
          "out (n, dim) <- the stored fp32 rows first..first+n-1 (normalised for cosine)")
      .def("slot_ids", [](const VectorIndex& ix) {
        // ids of every stored row, removed rows included (row order): filters map onto rows with it.
        std::vector<int64_t> v = ix.slot_ids();
        return numpy_copy(v.data(), {v.size()});
      })
      .def("state", [](const VectorIndex& ix) {
        // Copies of every array save() writes (slots() rows each) but the fp32 rows (read_rows).
        const size_t n = ix.slots(), d = ix.config().dim;
        nb::dict s;
        s["slots"] = (int64_t)n;
        s["next_id"] = ix.next_id();
        s["ids"] = numpy_copy(ix.ids().data(), {n});
        s["deleted"] = numpy_copy(ix.deleted().data(), {n});
        if (ix.config().storage == Storage::sq8) {
          s["codes"] = numpy_copy(ix.codes().data(), {n, d});
          s["sq8_min"] = numpy_copy(ix.sq8_min().data(), {ix.sq8_min().size()});
          s["sq8_scale"] = numpy_copy(ix.sq8_scale().data(), {ix.sq8_scale().size()});
        }
        if (ix.config().kind == IndexKind::hnsw) {
          s["entry"] = (int64_t)ix.entry();
          s["max_level"] = (int64_t)ix.max_level();
          s["levels"] = numpy_copy(ix.levels().data(), {n});
          s["links0"] = numpy_copy(ix.links0().data(), {n, (size_t)ix.links0().width()});
          std::vector<uint32_t> up = ix.upper_links();
          s["upper"] = numpy_copy(up.data(), {up.size()});
        }
        return s;
      })
      .def(
          "restore",
          [](VectorIndex& ix, int64_t slots, int64_t next_id, int64_t entry, int64_t max_level, Mat<float> vectors,
             Mat<uint8_t> codes, Vec<float> sq8_min, Vec<float> sq8_scale, Vec<int64_t> ids, Vec<uint8_t> deleted,
             Vec<int8_t> levels, Mat<uint32_t> links0, Vec<uint32_t> upper, bool view, int fd,
             int64_t vectors_offset, int64_t codes_offset, int64_t links0_offset) {
            // A section with an offset >= 0 is read from the open file fd (IndexState); its array
            // argument is then ignored.
            const IndexConfig& c = ix.config();
            const size_t n = slots, d = c.dim;
            const bool hnsw = c.kind == IndexKind::hnsw, sq8 = c.storage == Storage::sq8;
            check(fd >= 0 || (vectors_offset < 0 && codes_offset < 0 && links0_offset < 0),
                  "sections read from the file need its fd");
            check(c.rows_in_file ? vectors_offset >= 0 || n == 0
                                 : vectors_offset >= 0 || (vectors.shape(0) == n && vectors.shape(1) == d),
                  "vectors must have shape (slots, dim)");
            check(ids.shape(0) == n && deleted.shape(0) == n, "ids and deleted must have length slots");
            check(!sq8 || ((codes_offset >= 0 || (codes.shape(0) == n && codes.shape(1) == d)) &&
                           sq8_min.shape(0) == d && sq8_scale.shape(0) == d), "sq8 arrays have the wrong shape");
            check(!hnsw || (levels.shape(0) == n &&
                            (links0_offset >= 0 || (links0.shape(0) == n && links0.shape(1) == (size_t)(2 * c.M + 1)))),
                  "hnsw arrays have the wrong shape");
            IndexState s;
            s.slots = slots;
            s.next_id = next_id;
            s.entry = (uint32_t)entry;
            s.max_level = (int32_t)max_level;
            s.vectors = vectors.data();
            s.codes = codes.data();
            s.sq8_min = sq8_min.data();
            s.sq8_scale = sq8_scale.data();
            s.ids = ids.data();
            s.deleted = deleted.data();
            s.levels = levels.data();
            s.links0 = links0.data();
            s.upper = upper.data();
            s.upper_len = (int64_t)upper.shape(0);
            s.view = view;
            s.fd = fd;
            s.vectors_offset = vectors_offset;
            s.codes_offset = codes_offset;
            s.links0_offset = links0_offset;
            nb::gil_scoped_release release;
            ix.restore(s);
          },
          // view=True keeps pointers into vectors/codes/links0: tie their lifetime to the index.
          nb::keep_alive<1, 6>(), nb::keep_alive<1, 7>(), nb::keep_alive<1, 13>(), nb::arg("slots"),
          nb::arg("next_id"), nb::arg("entry"), nb::arg("max_level"), nb::arg("vectors").noconvert(),
          nb::arg("codes").noconvert(), nb::arg("sq8_min").noconvert(), nb::arg("sq8_scale").noconvert(),
          nb::arg("ids").noconvert(), nb::arg("deleted").noconvert(), nb::arg("levels").noconvert(),
          nb::arg("links0").noconvert(), nb::arg("upper").noconvert(), nb::arg("view"), nb::arg("fd"),
          nb::arg("vectors_offset"), nb::arg("codes_offset"), nb::arg("links0_offset"));

  auto gather = [](const std::string& kind, Vec<float> q, const void* base, size_t rows, size_t d, Vec<uint32_t> idx,
                   Vec<float> w, float bias, CArray<float, nb::ndim<1>> out, bool codes) {
    check(d >= 1, "base must have at least one column (dim >= 1)");   // the kernels size prefetches by the row
    check(q.shape(0) == d && out.shape(0) == idx.shape(0), "q must have length dim and out the length of idx");
    check(idx.shape(0) <= (size_t)INT_MAX, "idx must hold at most 2^31 - 1 rows");
    for (size_t i = 0; i < idx.shape(0); ++i) check(idx.data()[i] < rows, "idx holds a row past the end of base");
    const GatherKernels& K = gather_kernels();
    GatherFn fn = kind == "l2" ? (codes ? K.l2_sq8 : K.l2_f32) : kind == "ip" ? (codes ? K.ip_sq8 : K.ip_f32) : nullptr;
    if (!fn) value_error("kind must be 'l2' or 'ip'; got '" + kind + "'");
    check(!codes || kind != "l2" || w.shape(0) == d, "w must have length dim for sq8 l2");
    nb::gil_scoped_release release;
    fn(GatherQuery{q.data(), w.data(), bias}, base, (int64_t)d, idx.data(), (int)idx.shape(0), out.data());
  };
  m.def(
      "gather_distance",
      [gather](const std::string& kind, Vec<float> q, Mat<float> base, Vec<uint32_t> idx, Vec<float> w, float bias,
               CArray<float, nb::ndim<1>> out) {
        gather(kind, q, base.data(), base.shape(0), base.shape(1), idx, w, bias, out, false);
      },
      nb::arg("kind"), nb::arg("q").noconvert(), nb::arg("base").noconvert(), nb::arg("idx").noconvert(),
      nb::arg("w").noconvert(), nb::arg("bias"), nb::arg("out").noconvert(),
      "out[i] = distance(q, base[idx[i]]) (gather_distance.h); float32 base, or uint8 sq8 codes");
  m.def(
      "gather_distance",
      [gather](const std::string& kind, Vec<float> q, Mat<uint8_t> base, Vec<uint32_t> idx, Vec<float> w, float bias,
               CArray<float, nb::ndim<1>> out) {
        gather(kind, q, base.data(), base.shape(0), base.shape(1), idx, w, bias, out, true);
      },
      nb::arg("kind"), nb::arg("q").noconvert(), nb::arg("base").noconvert(), nb::arg("idx").noconvert(),
      nb::arg("w").noconvert(), nb::arg("bias"), nb::arg("out").noconvert());
}

}  // namespace quark::py
