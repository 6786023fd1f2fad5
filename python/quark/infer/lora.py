"""Many LoRA adapters over one base model, batched together (Punica: Chen et al. 2023, "Punica: Multi-Tenant
LoRA Serving"; S-LoRA: Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters").

The adapters are never merged into the base weights: every row of a batch runs the base projection
together (fused, quantized, whatever the base is), then each adapter adds its low-rank delta
(x A^T)(scale B)^T to its own rows, on the float side (RowAdapters). So requests with different
adapters, or none, share every decode step and never wait for each other, and an adapter costs its
rank, not a copy of the weights. A projection the runner fuses (q/k/v, gate/up) takes one delta for
all its targets (Stack: the targets' A stacked, B block-structured). The small matmuls go through
quark.ops.linear like the base's, on Quark's thread pool: torch's own (MKL) matmuls and index_add_
between them made the two pools fight for the cores, several times slower on a busy 2-core machine.

An adapter is Quark's (quark.model.lora: adapter.safetensors, what `quark sft` with LoRA writes) or
PEFT's (adapter_model.safetensors: peft's save_pretrained, `quark export --format peft`). Loading checks
it against the base: every tensor must name a projection of the base and fit its shape at the declared
rank, and the declared target modules must be the ones present; a mismatch names the tensor.
"""
from pathlib import Path

import torch

from quark import ops
from quark.model.hf import read_peft
from quark.model.lora import TARGETS, read_adapter


class Adapter:
    """One adapter ready to run beside its base: per (layer, target) A (r, in) and scale B (out, r)."""

    def __init__(self, name, weights, widths):
        self.name = name
        self.weights = weights        # {(layer, target): (A (r, in), scale B (out, r))}
        self.widths = widths          # {target: out_features of the base projection}
        self._stacks = {}

    @classmethod
    def load(cls, directory, model, name=None):
        """Read a Quark or PEFT adapter directory and check it fits model (a GPT, plain or quantized)."""
        directory = Path(directory)
        if (directory / "adapter.safetensors").exists():
            modules = _quark_modules(directory)
        elif (directory / "adapter_model.safetensors").exists():
            modules = read_peft(directory)
        else:
            raise FileNotFoundError(f"{directory} is not a LoRA adapter directory: it holds neither adapter.safetensors "
                                    "(Quark) nor adapter_model.safetensors (PEFT)")
        projections = {f"blocks.{i}.{part}.{t}": getattr(getattr(blk, part), t) for i, blk in enumerate(model.blocks)
                       for part in ("attn", "mlp") for t in TARGETS
                       if hasattr(getattr(blk, part), t)}
        widths = {m.rsplit(".", 1)[1]: p.out_features for m, p in projections.items()}   # the same in every layer
        dtype = model.tok_emb.weight.dtype
        weights = {}
        for module, (a, b, scale, (name_a, name_b)) in modules.items():
            base = projections.get(module)
            if base is None:
                raise ValueError(f"{directory}: tensor {name_a} has no place in the base model "
                                 f"({model.config.n_layer} layers)")
            shape_a, shape_b = (a.shape[0], base.in_features), (base.out_features, a.shape[0])
            for tensor_name, t, want in ((name_a, a, shape_a), (name_b, b, shape_b)):
                if tuple(t.shape) != want:
                    raise ValueError(f"{directory}: tensor {tensor_name} has shape {tuple(t.shape)}, the base model's "
                                     f"{module} needs {want}")
            _, i, _, target = module.split(".")
            weights[int(i), target] = (a.to(dtype).contiguous(), (b.to(torch.float32) * scale).to(dtype).contiguous())
        if not weights:
            raise ValueError(f"{directory}: the adapter holds no LoRA tensors")
        return cls(name or directory.name, weights, widths)

    def stack(self, i, targets):
        """-> this adapter's Stack of layer i's targets, or None when it touches none of them."""
        if (i, targets) not in self._stacks:
            self._stacks[i, targets] = Stack.of([self], i, targets)
        return self._stacks[i, targets]


class Stack:
    """The adapters of a batch over one projection (layer i's targets, their outputs side by side): every
    adapter's A for every target stacked, so one matmul gives x A^T of all of them, and their B in one
    block-structured matrix (each block at its target's output columns), so one more adds every delta.
    The zero blocks cost a little bandwidth; one matmul with short rows costs far less than one per target."""

    def __init__(self, a, b, owner):
        self.a = a                    # (R, in): the A of every (target, adapter), target by target
        self.b = b                    # (out, R): each B at its target's rows and its A's columns, zero elsewhere
        self.owner = owner            # (R,): the index of the adapter each row of a belongs to

    @classmethod
    def of(cls, adapters, i, targets):
        """A Stack of adapters (a sequence of Adapter) over layer i's targets, or None when none touches them."""
        blocks, owner, o0 = [], [], 0
        for t in targets:
            for g, ad in enumerate(adapters):
                if (i, t) in ad.weights:
                    blocks.append((o0, ad.weights[i, t]))
                    owner += [g] * ad.weights[i, t][0].shape[0]
            o0 += adapters[0].widths[t]
        if not blocks:
            return None
        a = torch.cat([w[0] for _, w in blocks])                                                  # (R, in)
        b = torch.zeros(o0, a.shape[0], dtype=a.dtype)                                            # (out, R)
        r0 = 0
        for o, (_, bt) in blocks:
            b[o:o + bt.shape[0], r0:r0 + bt.shape[1]] = bt
            r0 += bt.shape[1]
        return cls(a, b, torch.tensor(owner))

    def add(self, y, x, mask=None):
        """y (rows, out) += the deltas of x (rows, in), each row's from the adapters mask (rows, R) keeps."""
        h = ops.linear(x, self.a)                                                                 # (rows, R)
        if mask is not None:
            h *= mask
        y += ops.linear(h, self.b)
        return y


def _quark_modules(directory):
    """Quark's adapter directory -> read_peft's form: {module: (A, B, scale, (A's name, B's name))}."""
    config, state = read_adapter(directory)
    weights = Path(directory) / "adapter.safetensors"
    pairs = {}
    for name in state:
        module, half = name.rsplit(".", 1)
        if half not in ("lora_A", "lora_B"):
            raise ValueError(f"{weights}: tensor {name} is not a lora_A or lora_B weight")
        pairs.setdefault(module, {})[half] = name
    out = {}
    for module, names in sorted(pairs.items()):
        if len(names) < 2:
            (name,) = names.values()
            raise ValueError(f"{weights}: tensor {name} has no {'lora_B' if name.endswith('A') else 'lora_A'} partner")
        a, b = state[names["lora_A"]], state[names["lora_B"]]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != config.rank or b.shape[1] != config.rank:
            raise ValueError(f"{weights}: tensors {names['lora_A']} {tuple(a.shape)} and {names['lora_B']} "
                             f"{tuple(b.shape)} are not a rank-{config.rank} pair (adapter_config.json rank)")
        out[module] = (a, b, config.alpha / config.rank, (names["lora_A"], names["lora_B"]))
    found = {m.rsplit(".", 1)[1] for m in out}
    if found != set(config.targets):
        raise ValueError(f"{directory}/adapter_config.json: targets {sorted(config.targets)} but {weights.name} holds "
                         f"adapters for {sorted(found)}")
    return out


class RowAdapters:
    """The adapters the rows of one forward run, and the deltas they add to each projection.

    One adapter for every row (a prefill, or a batch on one adapter): its own Stack. Several, or some
    rows on none: the Stack of all of them, with a mask that keeps each row's own adapter's part of
    x A^T, so a whole batch takes the same few ops per projection whatever the number of adapters, with
    no gather or scatter of rows; the rank is small, so computing every adapter's x A^T for every row
    costs little. The stacks and masks of the running batch are kept in the runner's cache across steps:
    they change only when a request joins or leaves."""

    def __init__(self, adapters, distinct, cache):
        self.adapters, self.distinct = tuple(adapters), distinct
        self.single = distinct[0] if len(distinct) == 1 and None not in adapters else None
        if self.single is None:
            if cache.get("adapters") != distinct:
                cache.update(adapters=distinct, stacks={})
            if cache.get("rows") != self.adapters:
                cache.update(rows=self.adapters, masks={})
        self.cache = cache   # adapters, stacks {(layer, targets): Stack or None}, rows, masks {(layer, targets): mask}

    @classmethod
    def of(cls, adapters, cache):
        """adapters: the Adapter (or None) of each row -> RowAdapters, or None when no row runs one."""
        distinct = tuple(dict.fromkeys(a for a in adapters if a is not None))
        return cls(adapters, distinct, cache) if distinct else None

    def add(self, y, x, i, targets):
        """y (rows, out) += each row's adapter's delta of x (rows, in) for layer i's targets -> y."""
        if self.single is not None:
            stack = self.single.stack(i, targets)
            return y if stack is None else stack.add(y, x)
        stacks, masks = self.cache["stacks"], self.cache["masks"]
        if (i, targets) not in stacks:
            stacks[i, targets] = Stack.of(self.distinct, i, targets)
        stack = stacks[i, targets]
        if stack is None:
            return y
        if (i, targets) not in masks:
            rows = torch.tensor([-1 if a is None else self.distinct.index(a) for a in self.adapters])   # (rows,)
            masks[i, targets] = (rows[:, None] == stack.owner[None, :]).to(x.dtype)                     # (rows, R)
        return stack.add(y, x, masks[i, targets])
