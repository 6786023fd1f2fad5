"""AWQ: activation-aware int4 weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration"; llm-awq auto_scale / auto_clip).

A few input channels of each Linear carry much larger activations than the rest, and the weights
that multiply them matter most. AWQ protects them by scaling: y = W x = (W diag(s)) (x / s). The
weights of salient channels grow before rounding (so their relative rounding error shrinks) and the
activations shrink by the same factor, which is folded exactly into the operation that produces x:

  wq, wk, wv   x = attn_norm(h)      s divides attn_norm.weight
  wo           x = attention(v)      s divides the rows of wv (with GQA: one s per KV channel,
                                     shared by the query heads reading it)
  w1, w3       x = mlp_norm(h)       s divides mlp_norm.weight
  w2           x = silu(w1 h) * w3 h s divides the rows of w3

so the float model computes the same function and only the quantization error changes. The scale is
s = mean|x|^alpha per input channel (normalised), with alpha picked from a grid by the output error
of the round-to-nearest-quantized layers on calibration activations; alpha = 0 is plain RTN, so the
search never does worse than RTN on the calibration set. Then, per output row and group, a clipping
threshold is searched the same way (not for wq/wk: their errors pass through the softmax, as in
llm-awq). The result is a float model whose weights round well; quantize_model then rounds them.
"""
import torch

from quark.ops.quant import dequantize, quantize_rtn


def _pseudo_quantize(w, group_size):
    return dequantize(quantize_rtn(w, "int4", group_size))


@torch.no_grad()
def search_scale(x, weights, group_size, n_grid=20, act=None):
    """x (n, K) inputs shared by the layers with weights [(N_i, K)] -> (s (K,), alpha, rtn_loss, best_loss).

    act: per-channel activation magnitude (K,) used for s (default mean |x|); GQA passes a version
    averaged over the query heads that share a KV head, so that s can be folded into wv.
    """
    W = torch.cat([w.float() for w in weights])                                   # (N, K)
    ref = x @ W.T                                                                 # (n, N)
    act = x.abs().mean(0) if act is None else act                                 # (K,)
    best = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = act.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()                                        # centre around 1
        loss = float(((x @ (_pseudo_quantize(W * s, group_size) / s).T - ref) ** 2).mean())
        if i == 0:
            rtn_loss = loss
        if best is None or loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], rtn_loss, best[2]


@torch.no_grad()
def search_clip(w, x, group_size, n_grid=20, max_shrink=0.5, row_chunk=64):
    """Clip w (N, K) in place to the per-(row, group) threshold that minimises the quantized output
    error on x (n, K); returns the mean chosen fraction of the max |w|."""
    N, K = w.shape
    n_groups = K // group_size
    xg = x.view(-1, n_groups, group_size)                                         # (n, G, g)
    fractions = []
    for r0 in range(0, N, row_chunk):
        wg = w[r0:r0 + row_chunk].float().view(-1, n_groups, group_size)           # (c, G, g)
        org = torch.einsum("ngk,cgk->cng", xg, wg)                                # per-group partial outputs
        amax = wg.abs().amax(dim=-1, keepdim=True)                                # (c, G, 1)
        best_err = torch.full(amax.shape, float("inf"))
        best_frac = torch.ones_like(amax)
        for i in range(int(max_shrink * n_grid)):
            frac = 1 - i / n_grid
            m = amax * frac
            q = _pseudo_quantize(torch.clamp(wg, -m, m).reshape(-1, K), group_size).view_as(wg)
            err = (torch.einsum("ngk,cgk->cng", xg, q) - org).pow(2).mean(dim=1)[..., None]   # (c, G, 1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_frac = torch.where(better, torch.full_like(best_frac, frac), best_frac)
        m = amax * best_frac
        w[r0:r0 + row_chunk] = torch.clamp(wg, -m, m).reshape(-1, K).to(w.dtype)
        fractions.append(best_frac.flatten())
    return float(torch.cat(fractions).mean())


def _capture(block, x, cos, sin, layers, batch_size, max_tokens, generator):
    """Inputs of the given Linear layers while the block runs on x: {name: (tokens, K)}, at most
    max_tokens rows (the same random rows for every layer)."""
    from quark.optimize.quantize import run_block
    seen = {name: [] for name in layers}

    def hook(name):
        return lambda mod, inp, out: seen[name].append(inp[0].reshape(-1, mod.in_features))

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        out = run_block(block, x, cos, sin, batch_size)
    finally:
        for h in handles:
            h.remove()
    rows = None
    result = {}
    for name, parts in seen.items():
        a = torch.cat(parts).float()
        if rows is None:
            rows = torch.randperm(len(a), generator=generator)[:max_tokens]
        result[name] = a[rows]
    return result, out


@torch.no_grad()
def awq_model(model, calib, group_size=128, skip=("lm_head",), n_grid=20, max_tokens=2048, clip_tokens=512,
              clip=True, batch_size=16, seed=0):
    """Scale and clip every block of model (in place, float) for int4 with group_size; calib (n, T).
    clip=False: scaling only, which leaves the float model's function unchanged.

    Returns calibration info for the quantized model's metadata: the chosen alpha of each scaled
    group and the calibration output error of AWQ relative to RTN (mean over groups, < 1 is better).
    """
    from quark.optimize.quantize import block_inputs
    x, cos, sin = block_inputs(model, calib, batch_size)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    alphas, ratios, clips = {}, [], []

    def skipped(name):
        return any(name == s or name.endswith("." + s) for s in skip)

    for b, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        layers = {"wq": attn.wq, "wo": attn.wo, "w1": mlp.w1, "w2": mlp.w2}
        inp, out = _capture(block, x, cos, sin, layers, batch_size, max_tokens, gen)

        def scale(key, x_in, linears, fold, act=None):
            names = [f"blocks.{b}.{n}" for n in linears]
            mods = [block.get_submodule(n) for n in linears]
            if any(skipped(n) for n in names) or any(m.in_features % group_size for m in mods):
                return x_in
            s, alpha, rtn_loss, loss = search_scale(x_in, [m.weight for m in mods], group_size, n_grid, act)
            fold(s)
            for m in mods:
                m.weight.mul_(s.to(m.weight.dtype)[None, :])
            alphas[f"blocks.{b}.{key}"] = alpha
            ratios.append(loss / rtn_loss if rtn_loss > 0 else 1.0)
            return x_in / s

        x_qkv = scale("qkv", inp["wq"], ["attn.wq", "attn.wk", "attn.wv"],
                      lambda s: block.attn_norm.weight.div_(s.to(block.attn_norm.weight.dtype)))
        # wo: its input channels (head h, dim d) come from KV head h // rep; one scale per KV channel.
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        act = inp["wo"].abs().mean(0).view(Hkv, H // Hkv, D).mean(1)                # (Hkv, D)
        act = act[:, None, :].expand(Hkv, H // Hkv, D).reshape(-1)                  # (H * D,)

        def fold_v(s):
            attn.wv.weight.div_(s.view(Hkv, H // Hkv, D)[:, 0].reshape(-1, 1).to(attn.wv.weight.dtype))

        x_o = scale("o", inp["wo"], ["attn.wo"], fold_v, act)
        x_mlp = scale("mlp", inp["w1"], ["mlp.w1", "mlp.w3"],
                      lambda s: block.mlp_norm.weight.div_(s.to(block.mlp_norm.weight.dtype)))
        x_down = scale("down", inp["w2"], ["mlp.w2"], lambda s: mlp.w3.weight.div_(s[:, None].to(mlp.w3.weight.dtype)))
        for name, x_in in (("attn.wv", x_qkv), ("attn.wo", x_o), ("mlp.w1", x_mlp), ("mlp.w3", x_mlp),
                           ("mlp.w2", x_down)):
            m = block.get_submodule(name)
            if clip and not skipped(f"blocks.{b}.{name}") and m.in_features % group_size == 0:
                clips.append(search_clip(m.weight, x_in[:clip_tokens], group_size, n_grid))
        x = out   # the next block sees the float outputs (scaling and clipping barely change them)
    return {"alpha": alphas, "error_vs_rtn": round(sum(ratios) / max(len(ratios), 1), 4),
            "clip_fraction": round(sum(clips) / max(len(clips), 1), 4), "grid": n_grid}
