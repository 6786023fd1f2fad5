"""Serving tools over quark.infer's engine: the OpenAI-compatible server with its web UI, the
terminal chat and one-shot generation."""
