"""The sigmoid-routed Mixture of Experts of GLM-4.7-Flash (DeepSeek-V3 lineage, topk_method noaux_tc): the router, the
routed experts stacked per projection, and the block with its always-on shared expert.

Routing, in fp32: sigmoid scores of the router logits; the correction bias is added only to choose the top-k (within
the top topk_group of n_group groups when there are several); the weights are the unbiased scores of the chosen
experts, renormalized when norm_topk_prob, times routed_scaling_factor. Decode (up to DECODE_TOKENS tokens) runs the
chosen experts' GEMVs with kernels/moe_gemv.py, which reads the expert ids on the device (no host sync: graph-safe);
prefill groups the tokens by expert and runs each expert once over its tokens. It does not load weights: the loader
stacks the checkpoint's per-expert tensors into the experts' projections (glm4_moe_lite.checkpoint_target).
"""

import torch
import torch.nn.functional as F
from openclaw.kernels.moe_gemv import expert_rows, moe_gemv
from openclaw.kernels.qlinear import qlinear
from openclaw.models.layers import MLP, QuantLinear, linear
from torch import nn

DECODE_TOKENS = 16  # up to this many tokens a step, the experts run as GEMVs by device ids; more are grouped


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] router logits (fp32); bias: [E] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    if n_group > 1:  # keep the experts of the topk_group groups whose two best choice scores sum highest
        T, E = choice.shape
        groups = choice.view(T, n_group, E // n_group)
        best = groups.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        keep = torch.zeros(T, n_group, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
        choice = choice.masked_fill(~keep[:, :, None].expand_as(groups).reshape(T, E), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class Router(nn.Module):
    """weight [E, hidden] and e_score_correction_bias [E], held in fp32 (Family.fp32)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> logits [T, E] fp32."""
        return F.linear(x.float(), self.weight.float())


class Experts(nn.Module):
    """The routed experts: gate_proj, up_proj [E * I, hidden] and down_proj [E * hidden, I], expert e's rows at
    [e I, (e + 1) I) (resp. [e hidden, (e + 1) hidden)); QuantLinear kept row-major and in one piece when quantized."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, quantized: bool = False):
        super().__init__()
        self.hidden, self.inter, self.num_experts = hidden_size, intermediate_size, num_experts
        self.gate_proj = linear(hidden_size, num_experts * intermediate_size, False, quantized)
        self.up_proj = linear(hidden_size, num_experts * intermediate_size, False, quantized)
        self.down_proj = linear(intermediate_size, num_experts * hidden_size, False, quantized)
        self.quantized = quantized
        if quantized:
            for proj in (self.gate_proj, self.up_proj, self.down_proj):
                proj.row_major = True

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; weights, ids: [T, k] -> sum_k weights * expert_ids(x): [T, hidden] in x.dtype."""
        if x.shape[0] <= DECODE_TOKENS:
            return self._by_ids(x, weights, ids)
        return self._grouped(x, weights, ids)

    def _by_ids(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each (token, chosen expert) row through its expert, the ids read where they are (no host sync)."""
        T, k = ids.shape
        flat, w = ids.reshape(-1), weights.reshape(-1)
        if self.quantized:
            act = moe_gemv(x, self.gate_proj.qweight, flat, self.inter, x_div=k, up=self.up_proj.qweight)
            y = moe_gemv(act, self.down_proj.qweight, flat, self.hidden, scale=w, out_dtype=torch.float32)
        else:  # full precision (tests, small models): gather the chosen experts' matrices
            xs = x.repeat_interleave(k, dim=0)[:, :, None]
            gate = self.gate_proj.weight.view(-1, self.inter, self.hidden)[flat] @ xs
            up = self.up_proj.weight.view(-1, self.inter, self.hidden)[flat] @ xs
            act = (F.silu(gate.float()) * up.float()).to(x.dtype)
            y = (self.down_proj.weight.view(-1, self.hidden, self.inter)[flat] @ act).squeeze(-1).float() * w[:, None]
        return y.view(T, k, -1).sum(1).to(x.dtype)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Prefill: tokens sorted by expert, each expert run once over all its tokens (a host sync for the counts)."""
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        y = torch.zeros(T, self.hidden, dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            rows = order[start:start + count]
            start += count
            tokens = rows // k
            xe = x[tokens]
            gate = self._project(self.gate_proj, xe, e, self.inter)
            up = self._project(self.up_proj, xe, e, self.inter)
            act = (F.silu(gate.float()) * up.float()).to(x.dtype)
            out = self._project(self.down_proj, act, e, self.hidden).float() * weights.reshape(-1)[rows, None]
            y.index_add_(0, tokens, out)
        return y.to(x.dtype)

    @staticmethod
    def _project(proj: nn.Module, x: torch.Tensor, e: int, n: int) -> torch.Tensor:
        """x through expert e's n rows of a stacked projection."""
        if isinstance(proj, QuantLinear):
            return qlinear(x, expert_rows(proj.qweight, e * n, (e + 1) * n))
        return F.linear(x, proj.weight[e * n:(e + 1) * n])


class MoE(nn.Module):
    """Router + routed experts + shared expert (a SwiGLU MLP of n_shared_experts * moe_intermediate_size)."""

    def __init__(self, cfg, quantized: bool = False):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg.hidden_size, cfg.n_routed_experts)
        self.experts = Experts(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, quantized)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, quantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        c = self.cfg
        weights, ids = route(self.gate(x), self.gate.e_score_correction_bias, c.num_experts_per_tok, c.n_group,
                             c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        return self.experts(x, weights, ids) + self.shared_experts(x)
