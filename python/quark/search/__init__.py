"""Vector search: exact and HNSW indexes over int64 ids (quark.search.Index), used by retrieval and dedup."""
from quark.search.index import FORMAT_VERSION, Index, IndexFileError

__all__ = ["FORMAT_VERSION", "Index", "IndexFileError"]
