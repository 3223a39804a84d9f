"""Per-layer / per-head view of one eviction: how much of the NEXT queries' attention each policy's kept set holds.

    python bench/tri_heads.py --stats STATS.pt --text devil.txt [--budget 256 --cached 384 --future 128 --windows 8]

For each window: full attention over cached + future tokens; at the eviction point (cache = `cached` tokens)
every policy picks `budget` of them from the same cache (snapkv/rkv see the last 8 cached queries, h2o the attention
all cached queries paid, triattention only the stats); recall = share of the future queries' attention mass
(on the cached tokens, summed over each KV head's query group) that lands on the kept tokens. The oracle keeps the
top-budget tokens by that very mass. Printed per layer (mean over KV heads); per head rows and the heads'
concentration (dominant-band R) go to --json. A diagnostic, not the fidelity table.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from openclaw.models.layers import BatchMeta

from openclaw.config import EvictionConfig
from openclaw.engine.kv_pool import KVPool
from openclaw.eval.fidelity import text_windows
from openclaw.evict.calibrate import dominant_r
from openclaw.evict.evictor import EvictInputs, keep_indices, triattention_scores
from openclaw.evict.stats_file import load_stats, model_metadata
from openclaw.tokenizer import Tokenizer
from openclaw.weights.hub import resolve_model
from openclaw.weights.loader import load_model

POLICIES = ["streaming", "snapkv", "rkv", "h2o", "triattention", "triattention-trig", "triattention-norm"]


def mass(q: torch.Tensor, keys: torch.Tensor, first: int) -> torch.Tensor:
    """Attention [Hkv, n_keys] paid by queries q [T, H, D] at slots first..first+T-1 (causal) to keys [S, Hkv, D],
    summed over the queries and the query heads of each group."""
    T, H, D = q.shape
    S, hkv = keys.shape[0], keys.shape[1]
    qg = q.float().view(T, hkv, H // hkv, D).permute(1, 2, 0, 3)
    logits = qg @ keys.float().permute(1, 2, 0)[:, None] * D ** -0.5  # [Hkv, G, T, S]
    future = torch.arange(S)[None, :] > torch.arange(first, first + T)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), -1).sum((1, 2))


@torch.inference_mode()
def one_window(model, ids, stats, args):
    mc = model.config
    L, n = mc.num_hidden_layers, args.cached
    total = n + args.future
    pool = KVPool(L, total, mc.num_key_value_heads, mc.head_dim, torch.float32, "cpu")
    qs = [[] for _ in range(L)]
    calls = [0]

    def tap(q_pre, q_post):
        qs[calls[0] % L].append(q_post.clone())
        calls[0] += 1

    for s in range(0, total, 128):
        T = min(128, total - s)
        meta = BatchMeta(slot_mapping=torch.arange(s, s + T), seqs=[(0, T, 0, s + T)], sample_idx=torch.arange(0),
                         query_tap=tap)
        model(torch.tensor(ids[s:s + T]), torch.arange(s, s + T), meta, pool.k, pool.v)
    q = torch.stack([torch.cat(x) for x in qs])  # [L, total, H, D] post-RoPE
    keys = pool.k[:, :n]
    truth = torch.stack([mass(q[layer, n:], pool.k[layer], n)[:, :n] for layer in range(L)])  # [L, Hkv, n]
    paid = torch.stack([mass(q[layer, :n], keys[layer], 0) for layer in range(L)])  # h2o's accumulated attention
    inp = EvictInputs(keys=keys, t=n, queries=q[:, n - 8:n], attention=paid, stats=stats)
    base = EvictionConfig(budget=args.budget, divide_length=n - args.budget, pin_prompt=False, protect_recent=8,
                          stats="file")
    out = {}
    for name in POLICIES:
        policy, _, terms = name.partition("-")
        keep = keep_indices(replace(base, policy=policy, tri_terms=terms or "both"), inp)
        out[name] = (truth.gather(-1, keep).sum(-1) / truth.sum(-1))  # [L, Hkv]
    oracle = truth.topk(args.budget, dim=-1).indices
    out["oracle"] = truth.gather(-1, oracle).sum(-1) / truth.sum(-1)
    # rank agreement of the triattention score with the future attention, per (layer, query head group)
    raw = triattention_scores(inp, replace(base, policy="triattention"))  # [L, H, n]
    g = raw.shape[1] // truth.shape[1]
    agg = raw.view(L, truth.shape[1], g, n).amax(2)
    out["spearman"] = _spearman(agg, truth)
    return out


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = a.argsort(-1).argsort(-1).float(), b.argsort(-1).argsort(-1).float()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--stats", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--cached", type=int, default=384)
    ap.add_argument("--future", type=int, default=128)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    model_dir = resolve_model(args.model, Path.home() / ".cache" / "openclaw")
    model = load_model(model_dir, torch.device("cpu"), torch.float32)
    mc = model.config
    stats = load_stats(Path(args.stats), model_metadata(model, model_dir.name), model.bands.omega)
    ids = Tokenizer.from_dir(model_dir).encode(Path(args.text).read_text())
    results = [one_window(model, w, stats, args) for w in text_windows(ids, args.windows, args.cached + args.future)]
    mean = {k: torch.stack([r[k] for r in results]).mean(0) for k in results[0]}  # [L, Hkv]
    r_dom = dominant_r(stats).view(mc.num_hidden_layers, mc.num_key_value_heads, -1).mean(-1)  # [L, Hkv]
    names = POLICIES + ["oracle"]
    print(f"recall of the next {args.future} queries' attention, budget {args.budget} of {args.cached} cached "
          f"({args.windows} windows); R = dominant-band concentration of the group's query heads")
    print("layer  R     " + " ".join(f"{n.replace('triattention', 'tri'):>12}" for n in names) + "  spearman(tri)")
    for layer in range(mc.num_hidden_layers):
        vals = " ".join(f"{mean[n][layer].mean():12.3f}" for n in names)
        print(f"{layer:5d}  {r_dom[layer].mean():.2f} {vals}  {mean['spearman'][layer].mean():13.3f}")
    print("mean        " + " ".join(f"{mean[n].mean():12.3f}" for n in names) + f"  {mean['spearman'].mean():13.3f}")
    gap = mean["oracle"] - mean["triattention"]
    corr = torch.corrcoef(torch.stack([gap.flatten(), r_dom.flatten()]))[0, 1].item()
    print(f"per (layer, KV head): corr(oracle - triattention recall, R) = {corr:.3f}; "
          f"corr(spearman, R) = {torch.corrcoef(torch.stack([mean['spearman'].flatten(), r_dom.flatten()]))[0, 1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "r_dominant": r_dom.tolist(),
                                               **{k: v.tolist() for k, v in mean.items()}}, indent=1))


if __name__ == "__main__":
    main()
