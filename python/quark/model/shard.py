"""Tensor parallelism for the GPT and sharded safetensors checkpoints (Hugging Face layout).

Tensor-parallel layout over W ranks (Megatron-LM, Shoeybi et al. 2019):
  column-parallel  wq, wk, wv, w1, w3   each rank holds a block of output rows (whole heads for
                                        wq/wk/wv: n_head / W query and n_kv_head / W KV heads, so
                                        grouped-query attention stays rank-local)
  row-parallel     wo, w2               each rank holds the matching block of input columns; the
                                        partial outputs are summed with one all-reduce
  vocab-parallel   tok_emb, lm_head     each rank holds V / W rows: the embedding looks up the ids in
                                        its range and all-reduces; the head produces V / W logits per
                                        token and the cross-entropy combines max, sum-exp and the
                                        target logit across ranks without gathering the logits
  replicated       RMSNorm weights
So a block costs two all-reduces forward (after wo and after w2) and two backward (before wq/wk/wv
and before w1/w3), as in Megatron. Any process group backend works: gloo on CPU, NCCL on GPU.

Checkpoints: HF style, `model-00001-of-0000N.safetensors` files plus `model.safetensors.index.json`
{"metadata": {"total_size", ...}, "weight_map": {tensor: file}}, full (unsliced) tensors under their
Hugging Face names with transformers' config.json beside them (quark.model.hf), so transformers loads
a sharded directory as it is; directories written before, under GPT.state_dict() names with Quark's
config.json, still read. The files do not depend on the world size, so resharding
between world sizes is free at load time: rank r of W opens the files with safetensors' safe_open and
reads only its rows / columns of each tensor (get_slice), never the whole model. Saving from W ranks
gathers each tensor on the rank that owns its file (file k belongs to rank k % W), so no rank holds
more than its files. `reshard` rewrites a checkpoint into another number of files (1: a plain model
directory with model.safetensors); `quark.model.io.load_model` reads either form. The step that
reshards from the command line and checks tensor-parallel logits over processes is quark.optimize.shard.
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from quark import ops
from quark.io import atomic_open, atomic_write_json
from quark.model.config import GPTConfig, load_config
from quark.model.gpt import RMSNorm, apply_rope, rope_cache
from quark.model.hf import from_hf_name, hf_config, to_hf_name

INDEX_NAME = "model.safetensors.index.json"
FORMAT = "quark.sharded/1"

# Tensor name (GPT.state_dict) -> the dimension split across ranks; absent: replicated.
_SPLITS = [(re.compile(r"blocks\.\d+\.(attn\.w[qkv]|mlp\.w[13])\.weight"), 0),    # column-parallel
           (re.compile(r"blocks\.\d+\.(attn\.wo|mlp\.w2)\.weight"), 1),           # row-parallel
           (re.compile(r"(tok_emb|lm_head)\.weight"), 0)]                          # vocab-parallel


def split_dim(name):
    """The dimension of tensor `name` split across tensor-parallel ranks, or None (replicated)."""
    for pattern, dim in _SPLITS:
        if pattern.fullmatch(name):
            return dim
    return None


def check_tp(cfg: GPTConfig, world_size):
    """Raise ValueError naming the first dimension that world_size does not divide, or the first option
    of the Hugging Face family the tensor-parallel GPT does not implement."""
    for field in ("head_dim_override", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "sliding_window", "rope_scaling"):
        if getattr(cfg, field):
            raise ValueError(f"tensor parallelism does not implement {field}={getattr(cfg, field)!r}")
    for field in ("n_head", "n_kv_head", "ffn_hidden", "vocab_size"):
        if getattr(cfg, field) % world_size:
            raise ValueError(f"tensor parallelism over {world_size} ranks needs {field} ({getattr(cfg, field)}) "
                             f"divisible by {world_size}")


def _range(size, rank, world_size):
    n = size // world_size
    return rank * n, (rank + 1) * n


# ---- collectives with autograd (Megatron's f and g) ----------------------------------------------

class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of column-parallel layers)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum of row-parallel partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, ignore_index):
        # logits (M, V/W) float32: this rank's vocabulary slice; target (M,) global ids
        Vl = logits.shape[1]
        lmax = logits.max(dim=1).values
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX)
        z = logits - lmax[:, None]
        exp = z.exp()
        sumexp = exp.sum(dim=1)
        dist.all_reduce(sumexp)
        local = target - vocab_start
        mine = (local >= 0) & (local < Vl)
        local = local.clamp(0, Vl - 1)
        tgt = z.gather(1, local[:, None])[:, 0] * mine
        dist.all_reduce(tgt)
        valid = target != ignore_index
        n_valid = valid.sum().clamp(min=1)
        loss = ((sumexp.log() - tgt) * valid).sum() / n_valid
        ctx.save_for_backward(exp / sumexp[:, None], local, mine & valid, valid, n_valid)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, hit, valid, n_valid = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.nonzero(hit)[:, 0]
        g[rows, local[rows]] -= 1.0
        return g * valid[:, None] * (grad / n_valid), None, None, None


def vocab_parallel_cross_entropy(logits, target, vocab_start, ignore_index=-100):
    """Mean cross-entropy of logits split along the vocabulary: logits (..., V/W) of ids
    [vocab_start, vocab_start + V/W), target (...) global ids. Equals F.cross_entropy on the gathered logits."""
    return _VocabParallelCE.apply(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), vocab_start,
                                  ignore_index)


# ---- tensor-parallel model -----------------------------------------------------------------------

class ParallelLinear(nn.Module):
    """A weight slice: column-parallel (full input, out/W outputs) or row-parallel (in/W inputs, partial
    outputs all-reduced). No bias: the GPT has none."""

    def __init__(self, out_features, in_features, row_parallel=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.row_parallel = row_parallel

    def forward(self, x):
        y = F.linear(x, self.weight)
        return _ReduceFromTP.apply(y) if self.row_parallel else y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size, dim, rank, world_size):
        super().__init__()
        self.start, self.stop = _range(vocab_size, rank, world_size)
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, dim))

    def forward(self, idx):
        outside = (idx < self.start) | (idx >= self.stop)
        local = (idx - self.start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return _ReduceFromTP.apply(x)


class TPAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, world_size):
        super().__init__()
        self.H, self.Hkv, self.D = cfg.n_head // world_size, cfg.n_kv_head // world_size, cfg.head_dim
        self.wq = ParallelLinear(self.H * self.D, cfg.d_model)
        self.wk = ParallelLinear(self.Hkv * self.D, cfg.d_model)
        self.wv = ParallelLinear(self.Hkv * self.D, cfg.d_model)
        self.wo = ParallelLinear(cfg.d_model, self.H * self.D, row_parallel=True)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        x = _CopyToTP.apply(x)
        q = self.wq(x).view(B, T, self.H, self.D).transpose(1, 2)               # (B, H/W, T, D)
        k = self.wk(x).view(B, T, self.Hkv, self.D).transpose(1, 2)             # (B, Hkv/W, T, D)
        v = self.wv(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class TPMLP(nn.Module):
    def __init__(self, cfg: GPTConfig, world_size):
        super().__init__()
        f = cfg.ffn_hidden // world_size
        self.w1 = ParallelLinear(f, cfg.d_model)
        self.w3 = ParallelLinear(f, cfg.d_model)
        self.w2 = ParallelLinear(cfg.d_model, f, row_parallel=True)

    def forward(self, x):
        x = _CopyToTP.apply(x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TPBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, world_size):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = TPAttention(cfg, world_size)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = TPMLP(cfg, world_size)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TPGPT(nn.Module):
    """The GPT with its weights split over the ranks of the default process group. Parameter names
    match GPT's, each holding this rank's slice (split_dim). forward returns this rank's vocabulary
    slice of the logits (B, T, V/W) and, with targets, the full cross-entropy."""

    def __init__(self, cfg: GPTConfig, rank, world_size):
        super().__init__()
        check_tp(cfg, world_size)
        self.config, self.rank, self.world_size = cfg, rank, world_size
        self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, rank, world_size)
        self.blocks = nn.ModuleList(TPBlock(cfg, world_size) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = ParallelLinear(cfg.vocab_size // world_size, cfg.d_model)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, targets=None, ignore_index=-100):
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(_CopyToTP.apply(self.norm(x)))                       # (B, T, V/W)
        if targets is None:
            return logits, None
        return logits, vocab_parallel_cross_entropy(logits, targets, self.tok_emb.start, ignore_index)

    def gather_logits(self, logits):
        """This rank's (..., V/W) logits -> the full (..., V) on every rank."""
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)

    def tensor_names(self):
        """Names of the checkpoint tensors this model loads / saves (the tied head once)."""
        return [n for n in self.state_dict() if not (self.config.tie_embeddings and n == "lm_head.weight")]


def shard_state(state, rank, world_size):
    """A full state dict (GPT names) -> this rank's slices."""
    out = {}
    for name, t in state.items():
        dim = split_dim(name)
        if dim is not None:
            a, b = _range(t.shape[dim], rank, world_size)
            t = t.narrow(dim, a, b - a)
        out[name] = t.contiguous()
    return out


# ---- sharded checkpoints -------------------------------------------------------------------------

def _file_name(i, n):
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_files(sizes, num_shards=None, max_shard_bytes=None):
    """[(name, nbytes)] in order -> [file index per tensor], consecutive tensors per file: greedy with
    each file at most max_shard_bytes (a bigger tensor gets a file of its own), or num_shards files
    of balanced size (fewer when there are fewer tensors, or one tensor outweighs the rest)."""
    total = sum(b for _, b in sizes)
    files = []
    if num_shards is not None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        cum = 0
        for _, nbytes in sizes:   # a tensor goes to the file its midpoint falls in
            files.append(min(num_shards - 1, int((cum + nbytes / 2) * num_shards / max(total, 1))))
            cum += nbytes
        renumber = {f: i for i, f in enumerate(sorted(set(files)))}   # no empty files
        return [renumber[f] for f in files]
    if not max_shard_bytes or max_shard_bytes < 1:
        raise ValueError("give num_shards or a positive max_shard_bytes")
    current, used = 0, 0
    for _, nbytes in sizes:
        if used and used + nbytes > max_shard_bytes:
            current, used = current + 1, 0
        files.append(current)
        used += nbytes
    return files


def _write_index(directory, weight_map, total_size, metadata=None):
    atomic_write_json(Path(directory) / INDEX_NAME,
                      {"metadata": {"total_size": total_size, "format": FORMAT, **(metadata or {})},
                       "weight_map": {to_hf_name(k): f for k, f in weight_map.items()}})


def _write_file(path, tensors):
    from safetensors.torch import save
    with atomic_open(path) as f:   # "pt": what HF loaders expect in each shard
        f.write(save({to_hf_name(k): t for k, t in tensors.items()}, metadata={"format": "pt"}))


def _write_config(directory, cfg, dtype):
    atomic_write_json(Path(directory) / "config.json", hf_config(cfg, dtype=str(dtype).removeprefix("torch.")))


def save_sharded(state, directory, config: GPTConfig, num_shards=None, max_shard_bytes=None, tokenizer_path=None,
                 metadata=None):
    """Write full tensors {name: tensor} as an HF-style sharded checkpoint; returns the directory.
    num_shards=1 writes a plain model directory (model.safetensors, no index)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    stale_files = list(directory.glob("model-*-of-*.safetensors")) + [directory / INDEX_NAME, directory / "model.safetensors"]
    for stale in stale_files:
        stale.unlink(missing_ok=True)
    if num_shards == 1:
        _write_file(directory / "model.safetensors", state)
    else:
        sizes = [(k, v.numel() * v.element_size()) for k, v in state.items()]
        files = plan_files(sizes, num_shards, max_shard_bytes)
        n = files[-1] + 1
        weight_map = {k: _file_name(f, n) for (k, _), f in zip(sizes, files)}
        for i in range(n):
            _write_file(directory / _file_name(i, n), {k: state[k] for k, f in zip(state, files) if f == i})
        _write_index(directory, weight_map, sum(b for _, b in sizes), metadata)
    _write_config(directory, config, next(iter(state.values())).dtype)
    if tokenizer_path is not None and Path(tokenizer_path).exists() and \
            Path(tokenizer_path).resolve() != (directory / "tokenizer.json").resolve():
        (directory / "tokenizer.json").write_bytes(Path(tokenizer_path).read_bytes())
    return directory


class CheckpointReader:
    """Reads tensors, or slices of them, from a model directory: model.safetensors or HF-style shards.
    bytes_read counts the bytes of what was asked for (safe_open maps the files and copies only the
    requested slices)."""

    def __init__(self, directory):
        from safetensors import safe_open
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{index} is malformed ({e}); expected {{metadata, weight_map}}") from None
        elif (self.directory / "model.safetensors").exists():
            self.weight_map = None
        else:
            raise FileNotFoundError(f"{directory} holds neither model.safetensors nor {INDEX_NAME}")
        self._open, self._handles = safe_open, {}
        if self.weight_map is None:
            self.weight_map = dict.fromkeys(self._handle("model.safetensors").keys(), "model.safetensors")
        self.stored = {from_hf_name(n) or n: n for n in self.weight_map}   # GPT name -> name in the files
        self.bytes_read = 0

    def _handle(self, file):
        from safetensors import SafetensorError
        if file not in self._handles:
            path = self.directory / file
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing (listed in {INDEX_NAME})")
            try:
                self._handles[file] = self._open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path} is corrupted or truncated: {e}") from None
        return self._handles[file]

    def names(self):
        return list(self.stored)

    def read(self, name, dim=None, start=None, stop=None):
        """Tensor `name`, or its [start, stop) range along dim."""
        if name not in self.stored:
            raise KeyError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        stored = self.stored[name]
        sl = self._handle(self.weight_map[stored]).get_slice(stored)
        if dim is None:
            t = sl[:]
        else:
            rank = len(sl.get_shape())
            t = sl[tuple([slice(None)] * dim + [slice(start, stop)] + [slice(None)] * (rank - dim - 1))]
        self.bytes_read += t.numel() * t.element_size()
        return t


def load_state(directory):
    """All tensors of a model directory (single file or shards) by name."""
    reader = CheckpointReader(directory)
    return {name: reader.read(name) for name in reader.names()}


def load_tp_model(directory, rank, world_size):
    """This rank's TPGPT, reading only its slices of the checkpoint. Returns (model, bytes_read)."""
    cfg = load_config(directory)
    reader = CheckpointReader(directory)
    model = TPGPT(cfg, rank, world_size)
    state = {}
    for name in model.tensor_names():
        dim = split_dim(name)
        if dim is None:
            state[name] = reader.read(name)
        else:
            size = model.get_parameter(name).shape[dim] * world_size
            state[name] = reader.read(name, dim, *_range(size, rank, world_size))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state)
    return model.eval(), reader.bytes_read


def save_tp_model(model: TPGPT, directory, num_shards=None, max_shard_bytes=None, tokenizer_path=None):
    """Collective (every rank calls it): write the full model as an HF-style sharded checkpoint. Each
    tensor is gathered on the rank owning its file (file k -> rank k % world_size), which writes it."""
    cfg, W, rank = model.config, model.world_size, model.rank
    names = model.tensor_names()
    params = dict(model.named_parameters(remove_duplicate=False))
    full_shapes = {}
    for n in names:
        shape = list(params[n].shape)
        if split_dim(n) is not None:
            shape[split_dim(n)] *= W
        full_shapes[n] = shape
    sizes = [(n, math.prod(full_shapes[n]) * params[n].element_size()) for n in names]
    files = [0] * len(names) if num_shards == 1 else plan_files(sizes, num_shards, max_shard_bytes)
    n_files = files[-1] + 1
    directory = Path(directory)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    mine = {}
    for n, f in zip(names, files):
        owner = f % W
        t = params[n].detach().contiguous()
        dim = split_dim(n)
        if dim is None:
            if rank == owner:
                mine.setdefault(f, {})[n] = t.cpu().clone()
            continue
        parts = [torch.empty_like(t) for _ in range(W)] if rank == owner else None
        dist.gather(t, parts, dst=owner)
        if rank == owner:
            mine.setdefault(f, {})[n] = torch.cat(parts, dim=dim).cpu()
    for f, tensors in mine.items():
        _write_file(directory / ("model.safetensors" if n_files == 1 else _file_name(f, n_files)), tensors)
    if rank == 0:
        if n_files > 1:
            _write_index(directory, {n: _file_name(f, n_files) for n, f in zip(names, files)},
                         sum(b for _, b in sizes), {"saved_world_size": W})
        _write_config(directory, cfg, params[names[0]].dtype)
        if tokenizer_path is not None and Path(tokenizer_path).exists():
            (directory / "tokenizer.json").write_bytes(Path(tokenizer_path).read_bytes())
    dist.barrier()
    return directory


def reshard(src, dst, num_shards=None, max_shard_bytes=None):
    """Rewrite the model directory src as dst with another number of files (1: model.safetensors)."""
    src = Path(src)
    return save_sharded(load_state(src), dst, load_config(src), num_shards, max_shard_bytes,
                        tokenizer_path=src / "tokenizer.json")
