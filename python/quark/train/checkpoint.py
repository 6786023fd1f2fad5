"""Training checkpoints: model and optimizer state in safetensors, everything else in JSON.

Layout of one checkpoint (checkpoints/step_000120/):
    model-00000-of-00002.safetensors   one file per rank that holds a shard (FSDP2), or one file
    optim-00000-of-00002.safetensors   (single process, DDP) written by rank 0
    state.json                         step, data-loader position, RNG state, configs, optimizer
                                       hyper-parameters, sharding, and the SHA-256 of every file

Sharded tensors are split along dim 0 in rank order (FSDP2's Shard(0) placement), so concatenating
the files' pieces rebuilds the full tensor whatever world size wrote them, and any world size can
load any checkpoint (the full state is handed to torch.distributed.checkpoint.state_dict setters,
which re-shard it). Nothing is pickled.

Atomicity: every file goes into a hidden .tmp-step_N/ directory, state.json (with the checksums)
last, then the directory is renamed into place. A crash leaves a stale .tmp-* that is ignored and
cleaned; a checkpoint damaged later (truncated, bit-flipped, missing file) fails its checksums,
load_latest() says why and falls back to the previous one. keep_last prunes older ones.
"""
import base64
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quark.io import atomic_write_json, fsync_dir, sha256_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated or corrupted files, or bad metadata."""


def step_dir(root, step):
    return Path(root) / f"step_{step:06d}"


def list_checkpoints(root):
    """Finished checkpoint directories under root, newest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _save_tensors(path, tensors):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _local(t):
    """(local tensor, sharded?) for a plain tensor or a DTensor sharded along dim 0."""
    from torch.distributed.tensor import DTensor, Shard
    if isinstance(t, DTensor):
        if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
            raise CheckpointError(f"only dim-0 sharding is supported, got placements {t.placements}")
        return t.to_local(), any(isinstance(p, Shard) for p in t.placements)
    return t, False


def rng_state():
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def save_checkpoint(root, step, model_state, optim_state, meta, keep_last=2, rank=0, world_size=1, barrier=None):
    """Write checkpoint `step` under root from every rank (call it on all ranks together).

    model_state: {name: tensor or DTensor}; optim_state: the dict of
    torch.distributed.checkpoint.state_dict.get_optimizer_state_dict ({"state": {fqn: {k: tensor}},
    "param_groups": [...]}); meta: JSON-able (step, loader, configs...). barrier: a callable that
    synchronises the ranks (None for one process). Returns the checkpoint directory.
    """
    barrier = barrier or (lambda: None)
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp-step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()

    model_local, optim_local, sharded = {}, {}, set()
    for name, t in model_state.items():
        model_local[name], is_sharded = _local(t)
        if is_sharded:
            sharded.add(f"model/{name}")
    for fqn, per_param in optim_state["state"].items():
        for k, t in per_param.items():
            key = f"{fqn}::{k}"
            optim_local[key], is_sharded = _local(t) if isinstance(t, torch.Tensor) else (torch.tensor(t), False)
            if is_sharded:
                sharded.add(f"optim/{key}")
    # Ranks hold different pieces only when something is sharded; otherwise rank 0 writes it all.
    n_files = world_size if sharded else 1
    if rank < n_files:
        _save_tensors(tmp / f"model-{rank:05d}-of-{n_files:05d}.safetensors", model_local)
        _save_tensors(tmp / f"optim-{rank:05d}-of-{n_files:05d}.safetensors", optim_local)
    barrier()

    if rank == 0:
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.glob("*.safetensors"))}
        groups = [{k: v for k, v in g.items()} for g in optim_state["param_groups"]]
        atomic_write_json(tmp / "state.json", {**meta, "step": step, "n_files": n_files, "world_size": world_size,
                                               "sharded": sorted(sharded), "param_groups": groups, "files": files})
        fsync_dir(tmp)
        if final.exists():   # a rerun that reached the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in list_checkpoints(root)[max(keep_last, 1):]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def verify_checkpoint(directory):
    """-> state.json contents, after checking every file is present with the recorded size and hash."""
    directory = Path(directory)
    state_path = directory / "state.json"
    if not state_path.exists():
        raise CheckpointError(f"checkpoint {directory} is incomplete: state.json is missing")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory}: state.json is corrupted ({e})") from None
    for key in ("step", "files", "n_files", "sharded", "param_groups"):
        if key not in state:
            raise CheckpointError(f"checkpoint {directory}: state.json lacks {key!r}")
    for name, info in state["files"].items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint {directory}: {name} is truncated "
                                  f"({path.stat().st_size} bytes, expected {info['bytes']})")
        if sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: {name} is corrupted (SHA-256 mismatch)")
    return state


def _gather(directory, prefix, n_files, sharded, kind):
    """Full tensors from the per-rank files: sharded ones concatenated along dim 0 in rank order."""
    pieces = {}
    for r in range(n_files):
        path = Path(directory) / f"{prefix}-{r:05d}-of-{n_files:05d}.safetensors"
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {directory}: cannot read {path.name} ({e})") from None
        for k, v in part.items():
            pieces.setdefault(k, []).append(v)
    return {k: torch.cat(v, 0) if f"{kind}/{k}" in sharded else v[0] for k, v in pieces.items()}


def load_checkpoint(directory):
    """-> (state.json dict, full model state {name: tensor}, full optimizer state dict).
    Raises CheckpointError naming what is wrong."""
    state = verify_checkpoint(directory)
    sharded = set(state["sharded"])
    model = _gather(directory, "model", state["n_files"], sharded, "model")
    flat = _gather(directory, "optim", state["n_files"], sharded, "optim")
    optim = {"state": {}, "param_groups": state["param_groups"]}
    for key, t in flat.items():
        fqn, k = key.rsplit("::", 1)
        optim["state"].setdefault(fqn, {})[k] = t
    return state, model, optim


def load_latest(root, log=print):
    """The newest usable checkpoint under root as load_checkpoint() returns it, or None.
    Damaged checkpoints are reported through log and skipped in favour of older ones."""
    for directory in list_checkpoints(root):
        try:
            return load_checkpoint(directory)
        except CheckpointError as e:
            log(f"refusing {e}; falling back to the previous checkpoint")
    return None
