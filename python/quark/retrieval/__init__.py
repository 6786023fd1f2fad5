"""Retrieval: embeddings, chunking, the hybrid SQLite + vector store, RAG and tools."""
