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

Both searches score a weight error E = W_q - W (N, K) by its mean squared output error over all the
calibration tokens X (n, K): mean((X E^T)^2) = sum_r (E H E^T)_rr / N with H = X^T X / n, and a
group's share of it by the group's diagonal block of H. So every calibration token counts, and
the cost of a grid point does not grow with the number of tokens (llm-awq subsamples instead).
"""
import torch
import torch.nn.functional as F

from quark.nn.patch import is_skipped
from quark.ops.quant import dequantize, padded_k, quantize_rtn
from quark.optimize.calibration import block_inputs, run_block


def _pseudo_quantize(w, group_size):
    return dequantize(quantize_rtn(w, "int4", group_size))


def output_error(e, h):
    """Mean squared output error of weight error e (N, K) over inputs with second moment h (K, K)."""
    return float(((e @ h) * e).sum()) / e.shape[0]


@torch.no_grad()
def search_scale(h, act, weights, group_size, n_grid=20):
    """Inputs with second moment h (K, K) and mean magnitude act (K,), shared by the layers with
    weights [(N_i, K)] -> (s (K,), alpha, rtn_loss, best_loss).

    act is the per-channel activation magnitude mean|x| that s is built from; GQA passes a version
    averaged over the query heads sharing a KV head, so that s can be folded into wv.
    """
    W = torch.cat([w.float() for w in weights])                                   # (N, K)
    best = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = act.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()                                        # centre around 1
        loss = output_error(_pseudo_quantize(W * s, group_size) / s - W, h)
        if i == 0:
            rtn_loss = loss
        if best is None or loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], rtn_loss, best[2]


@torch.no_grad()
def search_clip(w, h, group_size, n_grid=20, max_shrink=0.5, row_chunk=256):
    """Clip w (N, K) in place to the per-(row, group) threshold that minimises the quantized output
    error over inputs with second moment h (K, K); returns the mean chosen fraction of the max |w|.
    K not a multiple of the group: the last group is padded with zero weights and inputs (as the
    int4 format pads it), which neither clip nor add error."""
    N, K0 = w.shape
    K = padded_k(K0, group_size)
    h = F.pad(h, (0, K - K0, 0, K - K0))
    n_groups = K // group_size
    idx = torch.arange(K).view(n_groups, group_size)
    hg = h[idx[:, :, None], idx[:, None, :]]                                      # (G, g, g) diagonal blocks
    fractions = []
    for r0 in range(0, N, row_chunk):
        wg = F.pad(w[r0:r0 + row_chunk].float(), (0, K - K0)).view(-1, n_groups, group_size)   # (c, G, g)
        amax = wg.abs().amax(dim=-1, keepdim=True)                                # (c, G, 1)
        best_err = torch.full(amax.shape, float("inf"))
        best_frac = torch.ones_like(amax)
        for i in range(int(max_shrink * n_grid)):
            frac = 1 - i / n_grid
            m = amax * frac
            e = _pseudo_quantize(torch.clamp(wg, -m, m).reshape(-1, K), group_size).view_as(wg) - wg
            err = (torch.einsum("cgk,gkl->cgl", e, hg) * e).sum(-1, keepdim=True)  # (c, G, 1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_frac = torch.where(better, torch.full_like(best_frac, frac), best_frac)
        m = amax * best_frac
        w[r0:r0 + row_chunk] = torch.clamp(wg, -m, m).reshape(-1, K)[:, :K0].to(w.dtype)
        fractions.append(best_frac.flatten())
    return float(torch.cat(fractions).mean())


def _input_moments(block, x, cos, sin, layers, batch_size):
    """Run the block on x, accumulating over every token the inputs of the given Linear layers:
    {name: (H = X^T X / n (K, K), mean |x| (K,))}; also returns the block's output."""
    sums = {name: [0, 0, 0] for name in layers}

    def hook(name):
        def fn(mod, inp, out):
            a = inp[0].reshape(-1, mod.in_features).double()                     # (tokens, K)
            acc = sums[name]
            acc[0] = acc[0] + a.T @ a
            acc[1] = acc[1] + a.abs().sum(0)
            acc[2] += a.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        out = run_block(block, x, cos, sin, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {name: ((hh / n).float(), (act / n).float()) for name, (hh, act, n) in sums.items()}, out


@torch.no_grad()
def awq_model(model, calib, group_size=128, skip=("lm_head",), n_grid=20, clip=True, batch_size=16):
    """Scale and clip every block of model (in place, float) for int4 with group_size; calib (n, T).
    clip=False: scaling only, which leaves the float model's function unchanged.

    Returns calibration info for the quantized model's metadata: the chosen alpha of each scaled
    group and the calibration output error of AWQ relative to RTN (mean over groups, < 1 is better).
    """
    x, cos, sin = block_inputs(model, calib, batch_size)
    cfg = model.config
    alphas, ratios, clips = {}, [], []

    for b, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        moments, out = _input_moments(block, x, cos, sin, {"wq": attn.wq, "wo": attn.wo, "w1": mlp.w1, "w2": mlp.w2},
                                      batch_size)

        def scale(key, h, act, linears, fold):
            """Search s for the layers reading one input, fold it; returns that input's new moment."""
            names = [f"blocks.{b}.{n}" for n in linears]
            mods = [block.get_submodule(n) for n in linears]
            if any(is_skipped(n, skip) for n in names):
                return h
            s, alpha, rtn_loss, loss = search_scale(h, act, [m.weight for m in mods], group_size, n_grid)
            fold(s)
            for m in mods:
                m.weight.mul_(s.to(m.weight.dtype)[None, :])
            alphas[f"blocks.{b}.{key}"] = alpha
            ratios.append(loss / rtn_loss if rtn_loss > 0 else 1.0)
            return h / s[:, None] / s[None, :]                                    # moment of x / s

        h_qkv = scale("qkv", *moments["wq"], ["attn.wq", "attn.wk", "attn.wv"],
                      lambda s: block.attn_norm.weight.div_(s.to(block.attn_norm.weight.dtype)))
        # wo: its input channels (head h, dim d) come from KV head h // rep; one scale per KV channel.
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        h_o, act = moments["wo"]
        act = act.view(Hkv, H // Hkv, D).mean(1)                                    # (Hkv, D)
        act = act[:, None, :].expand(Hkv, H // Hkv, D).reshape(-1)                  # (H * D,)

        def fold_v(s):
            attn.wv.weight.div_(s.view(Hkv, H // Hkv, D)[:, 0].reshape(-1, 1).to(attn.wv.weight.dtype))

        h_o = scale("o", h_o, act, ["attn.wo"], fold_v)
        h_mlp = scale("mlp", *moments["w1"], ["mlp.w1", "mlp.w3"],
                      lambda s: block.mlp_norm.weight.div_(s.to(block.mlp_norm.weight.dtype)))
        h_down = scale("down", *moments["w2"], ["mlp.w2"],
                       lambda s: mlp.w3.weight.div_(s[:, None].to(mlp.w3.weight.dtype)))
        for name, h in (("attn.wv", h_qkv), ("attn.wo", h_o), ("mlp.w1", h_mlp), ("mlp.w3", h_mlp),
                        ("mlp.w2", h_down)):
            m = block.get_submodule(name)
            if clip and not is_skipped(f"blocks.{b}.{name}", skip):
                clips.append(search_clip(m.weight, h, group_size, n_grid))
        x = out   # the next block sees the float outputs (scaling and clipping barely change them)
    return {"alpha": alphas, "error_vs_rtn": round(sum(ratios) / max(len(ratios), 1), 4),
            "clip_fraction": round(sum(clips) / max(len(clips), 1), 4), "grid": n_grid}
