"""torch.distributed for the trainer: process-group setup (gloo on CPU, NCCL on CUDA), DDP and FSDP2
(fully_shard) wrapping, full/sharded state dicts, small collectives, and a local launcher.

Run under torchrun (`torchrun --nproc_per_node 2 -m quark.cli pretrain --run-dir R --strategy fsdp`),
which sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, or with spawn(), which does the same for
N processes on this machine (what `quark pretrain --nproc N` and the tests use).
"""
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def mean(self, value):
        """Mean of a Python float over ranks."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size


def init_distributed(device=None):
    """Join the process group described by torchrun's environment variables (no-op without them)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, device)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model, strategy, env: Dist, precision="float32"):
    """DDP: replicate and all-reduce gradients. FSDP2: shard every block, then the root (embeddings,
    final norm and the tied head, which must stay in one group since they share a parameter); with
    precision "bfloat16" its mixed-precision policy gathers parameters in bf16 (half the all-gather
    bytes) while gradients are reduced and the fp32 master weights updated in fp32."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "none" or not env.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_state(model):
    """Parameters keyed by name (DTensor shards under FSDP2), without the tied head's alias."""
    state = get_model_state_dict(model)
    if unwrap(model).config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_full_state(model, optimizer, model_sd, optim_sd):
    """Load full (unsharded) state into a possibly wrapped model: each rank keeps its own shard."""
    options = StateDictOptions(full_state_dict=True, strict=True)
    if unwrap(model).config.tie_embeddings and "lm_head.weight" not in model_sd:
        model_sd = {**model_sd, "lm_head.weight": model_sd["tok_emb.weight"]}
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def full_model_state(model):
    """Full CPU tensors of every parameter (gathered from all shards; call on every rank)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, threads, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        fn(*args)
    finally:
        shutdown()


def spawn(fn, world_size, *args, threads=None):
    """Run fn(*args) in world_size local processes forming one process group (like torchrun).
    fn must be importable (a module-level function). Raises if any process fails."""
    threads = threads or max(1, torch.get_num_threads() // world_size)
    mp.spawn(_entry, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)
