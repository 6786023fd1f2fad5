"""Orchestration: intent classifier, router, agents with a shared task board."""
