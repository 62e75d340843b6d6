"""Fast exact kernels for MoLELayer's fused path (all equal to `MoLELayer.forward_naive` up to rounding).

Notation as in mole_layer.py: tokens x (b, n, d), stacked expert factors A (R, d) and B (o, R), per-expert mixing
coefficients coef (b, n|1, e) = alpha_i / r_i * s_i * g_i * ...;
Y = F(x) + ((x A^T) * coef expanded to the rank rows) B^T.

- `LowRankMix`: the training path. Base and experts are frozen, so the backward needs no weight gradients; it saves
  only x (which the gate projection saves anyway) and coef (b, n, e), and recomputes h = x A^T when coef needs a
  gradient. Autograd's own graph would keep h and h * coef, two (b, n, R) tensors per layer.
- `MergedMix`: the training path when coef is per sample (global-only gating) and tokens outnumber what a merge
  costs: one GEMM per sample against W + B diag(coef_b) A, and a backward that forms G_b = dY_b^T X_b (o, d) once
  for the coefficient gradients instead of two rank-R passes over the tokens.
- `merged_per_sample`: inference with one coefficient per sample (global-only gating, no gating, routing): the
  per-sample weight W + B diag(coef_b) A costs o R d once per sample instead of n R (d + o) per sample.
- `dense_experts`: inference with per-token coefficients on layers whose experts have more rank rows than their
  dense size warrants (e o d < R (d + o), e.g. rank 256 on SD1.5's 320-wide attention): one GEMM against the cached
  stack [W; B_1 A_1; ...] gives F(x) and every expert's output, mixed per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_rows(h: torch.Tensor, coef: torch.Tensor, owner: torch.Tensor, uniform_rank: int) -> torch.Tensor:
    """h (b, n, R) times coef (b, n|1, e) broadcast to each expert's rank rows (owner: (R,) expert of each row)."""
    if uniform_rank:
        b, n, rows = h.shape
        return (h.view(b, n, -1, uniform_rank) * coef.unsqueeze(-1)).view(b, n, rows)
    return h * coef.index_select(-1, owner)


def sum_rows(p: torch.Tensor, owner: torch.Tensor, num_experts: int, uniform_rank: int) -> torch.Tensor:
    """The adjoint of expand_rows' broadcast: (b, n, R) -> (b, n, e), summing each expert's rank rows."""
    if uniform_rank:
        b, n, _ = p.shape
        return p.view(b, n, num_experts, uniform_rank).sum(-1)
    return p.new_zeros(*p.shape[:2], num_experts).index_add_(-1, owner, p)


def choose_path(tokens: int, d: int, o: int, rows: int, experts: int, per_sample: bool, dense_ok: bool = True) -> str:
    """Which inference kernel costs the fewest multiply-adds for one sample at one layer.

    "merged": coef is per sample and W + B diag(coef) A (d o R once) beats n R (d + o) with a margin of 2;
    "dense": e d o < R (d + o), so the cached [W; B_i A_i] stack is cheaper than the rank-R factors per token;
    "lowrank": the stacked factors, x A^T then B.
    """
    if per_sample and tokens * (d + o) > 2 * d * o:
        return "merged"
    if dense_ok and experts * d * o < rows * (d + o):
        return "dense"
    return "lowrank"


class LowRankMix(torch.autograd.Function):
    """out + (expand(x A^T, coef)) B^T for frozen A (R, d) and B (o, R); gradients for x, coef and out only.

    out: F(x) as (b * n, o) contiguous (the sum is fused into one addmm), or None to return the update alone
    (b, n, o). keep_h: save h = x A^T (b, n, R) for the backward instead of recomputing it (more memory, one GEMM
    less per layer and step).
    """

    @staticmethod
    def forward(ctx, out, x, A, B, coef, owner, uniform_rank: int, keep_h: bool):  # noqa: N803 (A, B as in the paper)
        b, n, d = x.shape
        h = F.linear(x, A)  # (b, n, R)
        hc = expand_rows(h, coef, owner, uniform_rank).reshape(b * n, -1)
        y = torch.addmm(out, hc, B.t()) if out is not None else (hc @ B.t()).view(b, n, -1)
        ctx.uniform_rank = uniform_rank
        ctx.num_experts = coef.shape[-1]
        ctx.keep_h = keep_h
        if keep_h:
            ctx.save_for_backward(x, coef, A, B, owner, h)
        else:
            ctx.save_for_backward(x, coef, A, B, owner)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, coef, A, B, owner = ctx.saved_tensors[:5]  # noqa: N806
        b, n, d = x.shape
        need_out, need_x, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        dhc = (dy.reshape(b * n, -1) @ B.to(dy.dtype)).view(b, n, -1)  # (b, n, R): dL/d(h * coef)
        dx = dcoef = None
        if need_coef:
            h = ctx.saved_tensors[5] if ctx.keep_h else F.linear(x, A)
            dcoef = sum_rows(dhc * h, owner, ctx.num_experts, ctx.uniform_rank)  # (b, n, e)
            if coef.shape[1] == 1:
                dcoef = dcoef.sum(1, keepdim=True)
            if coef.shape[0] == 1:
                dcoef = dcoef.sum(0, keepdim=True)
        if need_x:
            dx = F.linear(expand_rows(dhc, coef.to(dhc.dtype), owner, ctx.uniform_rank), A.t().to(dhc.dtype))
        return (dy if need_out else None), dx, None, None, dcoef, None, None, None


class MergedMix(torch.autograd.Function):
    """F(x) + sum_i coef_bi E_i(x) for per-sample coef (b, 1, e) and frozen W (o, d), bias, A (R, d), B (o, R):
    y_b = x_b M_b (+ bias) with M_b = W^T + A^T diag(coef_b) B^T (d, o). Gradients for x and coef only.

    Backward: dx_b = dy_b M_b^T; dcoef_bi = sum over expert i's rows j of sum_od B_oj G_bod A_jd with
    G_b = dy_b^T x_b, i.e. the rows of (G_b A^T) (o, R) dotted with B's columns. Saves x, coef and M (b, d, o).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, coef, owner, uniform_rank: int):  # noqa: N803
        merged = merged_weights(weight, A, B, coef, owner)  # (b, d, o)
        y = torch.bmm(x, merged)  # (b, n, o)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, merged, A, B, owner)
        ctx.uniform_rank, ctx.num_experts = uniform_rank, coef.shape[-1]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, merged, A, B, owner = ctx.saved_tensors  # noqa: N806
        dx = dcoef = None
        if ctx.needs_input_grad[0]:
            dx = torch.bmm(dy, merged.transpose(1, 2))  # (b, n, d)
        if ctx.needs_input_grad[5]:
            g = torch.bmm(dy.transpose(1, 2), x)  # (b, o, d)
            per_row = (torch.matmul(g, A.t()) * B).sum(1)  # (b, R): sum_od B_oj G_od A_jd
            dcoef = sum_rows(per_row.unsqueeze(1), owner, ctx.num_experts, ctx.uniform_rank)  # (b, 1, e)
        return dx, None, None, None, None, dcoef, None, None


def merged_per_sample(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,  # noqa: N803
                      B: torch.Tensor, coef: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """F(x) + sum_i coef_bi E_i(x) for coef (b, 1, e) as one GEMM per sample against W + B diag(coef_b) A.

    Returns (b, n, o). Exact: the same sums, grouped differently.
    """
    y = torch.bmm(tokens, merged_weights(weight, A, B, coef, owner))  # (b, n, o)
    return y if bias is None else y + bias


def merged_weights(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, coef: torch.Tensor,  # noqa: N803
                   owner: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """M_b = W^T + A^T diag(coef_b) B^T (b, d, o) for W (o, d), A (R, d), B (o, R), coef (b, 1, e)."""
    a_rows = A.t() * coef.index_select(-1, owner)  # (b, d, R): A^T with each expert's columns scaled
    return torch.baddbmm(weight.t().unsqueeze(0), a_rows, B.t().unsqueeze(0).expand(coef.shape[0], -1, -1))


def dense_experts(tokens: torch.Tensor, stacked: torch.Tensor, bias: torch.Tensor | None,
                  coef: torch.Tensor) -> torch.Tensor:
    """stacked = [W; D_1; ...; D_e] ((1 + e) o, d) with D_i = B_i A_i; returns F(x) + sum_i coef_i D_i x
    as (b, n, o) for coef (b, n|1, e)."""
    b, n, _ = tokens.shape
    e = coef.shape[-1]
    z = F.linear(tokens, stacked).view(b, n, 1 + e, -1)  # (b, n, 1 + e, o)
    y = z[:, :, 0] if bias is None else z[:, :, 0] + bias
    for i in range(e):
        y = torch.addcmul(y, coef[..., i : i + 1], z[:, :, 1 + i])
    return y
