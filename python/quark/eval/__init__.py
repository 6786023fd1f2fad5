"""Evaluation: perplexity / bits-per-byte, multiple-choice and generation tasks, sandboxed code
tasks (pass@k), regression gates, telemetry, and the run report."""
