"""Vector search: exact and HNSW indexes over int64 ids (quark.search.Index), used by retrieval and dedup."""
from quark._runtime import init_threads
from quark.search.index import FORMAT_VERSION, Index, IndexFileError

init_threads()

__all__ = ["FORMAT_VERSION", "Index", "IndexFileError"]
