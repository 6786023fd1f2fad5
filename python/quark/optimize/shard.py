"""`quark shard`: reshard a model directory into HF-style safetensors files, and check that the
tensor-parallel model (quark.model.shard) over W gloo processes gives the unsharded model's logits."""
import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from quark.config import ConfigError
from quark.io import atomic_write_json
from quark.model.config import load_config
from quark.model.io import load_model
from quark.model.shard import check_tp, load_state, load_tp_model, reshard
from quark.train.distributed import init_distributed, shutdown, spawn

# ---- check: tensor-parallel forward vs the unsharded model ---------------------------------------

def _check_worker(directory, out_path, tokens=None, seed=0):
    """Under a process group: load this rank's shard, run forward + loss, compare with the full model."""
    env = init_distributed(torch.device("cpu"))
    model, nbytes = load_tp_model(directory, env.rank, env.world_size)
    if tokens is None:   # the same on every rank
        cfg = model.config
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (2, min(33, cfg.max_seq_len + 1)), generator=g).tolist()
    idx = torch.tensor(tokens)
    with torch.no_grad():
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        full = model.gather_logits(logits)
    if env.rank == 0:
        ref = load_model(directory)
        with torch.no_grad():
            ref_logits, ref_loss = ref(idx[:, :-1], idx[:, 1:])
        result = {"world_size": env.world_size, "max_abs_diff": float((full - ref_logits).abs().max()),
                  "loss": float(loss), "reference_loss": float(ref_loss)}
        sizes = torch.tensor([nbytes], dtype=torch.int64)
        gathered = [torch.zeros_like(sizes) for _ in range(env.world_size)]
        dist.gather(sizes, gathered, dst=0)
        result["bytes_read_per_rank"] = [int(g) for g in gathered]
        result["checkpoint_bytes"] = sum(t.numel() * t.element_size() for t in load_state(directory).values())
        atomic_write_json(out_path, result)
    else:
        dist.gather(torch.tensor([nbytes], dtype=torch.int64), None, dst=0)


def check_tensor_parallel(directory, world_size=2, tokens=None, seed=0):
    """Spawn world_size gloo processes; -> {max_abs_diff, loss, reference_loss, bytes_read_per_rank, ...}."""
    import tempfile

    check_tp(load_config(directory), world_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "check.json"
        spawn(_check_worker, world_size, str(directory), str(out), tokens, seed, threads=1)
        return json.loads(out.read_text())


# ---- CLI: quark shard MODEL_DIR --out DIR [--num-shards N | --max-shard-mb M] [--check-tp W] -----

def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("model_dir", help="model directory (model.safetensors or HF-style shards + config.json)")
    parser.add_argument("--out", default=None, help="write the checkpoint here, resharded")
    parser.add_argument("--num-shards", type=int, default=None, help="number of files (1: a single model.safetensors)")
    parser.add_argument("--max-shard-mb", type=float, default=None, help="or: largest file size in MB")
    parser.add_argument("--check-tp", type=int, default=0, metavar="W",
                        help="run the (output) checkpoint tensor-parallel over W local gloo processes and compare "
                             "its logits with the unsharded model")


def run_cli(args):
    if args.out is None and not args.check_tp:
        print("error: nothing to do; give --out (reshard) and/or --check-tp W")
        return 2
    if args.out is not None and (args.num_shards is None) == (args.max_shard_mb is None):
        print("error: with --out give exactly one of --num-shards and --max-shard-mb")
        return 2
    try:
        target = Path(args.model_dir)
        if args.out is not None:
            target = reshard(args.model_dir, args.out, args.num_shards,
                             int(args.max_shard_mb * 1e6) if args.max_shard_mb else None)
            files = sorted(p.name for p in target.glob("*.safetensors"))
            print(f"wrote {len(files)} file(s) to {target}: {', '.join(files)}")
        if args.check_tp:
            r = check_tensor_parallel(target, args.check_tp)
            print(json.dumps(r, indent=1))
            if r["max_abs_diff"] > 1e-3:
                print("error: tensor-parallel logits differ from the unsharded model")
                return 1
    except (FileNotFoundError, ValueError, KeyError, ConfigError) as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":   # torchrun --nproc_per_node 2 -m quark.optimize.shard MODEL_DIR OUT_JSON
    import sys

    try:
        _check_worker(sys.argv[1], sys.argv[2])
    finally:
        shutdown()
