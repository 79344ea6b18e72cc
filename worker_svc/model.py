"""Llama forward pass in tinygrad over the paged KV cache, for a batch of B rows of T tokens each.

Decode is T = 1; a prefill chunk is T > 1. Every input is a device tensor of fixed shape, and the number of
blocks attention reads is a bound symbolic variable, so one captured graph per (B, T) serves every context length.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

from shared.llama_config import LlamaConfig
from worker_svc import gemv, tc_gemm
from worker_svc.kv_cache import PagedKVCache
from worker_svc.paged_attention import paged_decode_attention
from worker_svc.residual_norm import residual_norm
from worker_svc.weights import LlamaWeights


def rms_norm(x: Tensor, weight: Tensor, eps: float, materialize: bool = False) -> Tensor:
    """materialize: write the normed rows to a buffer of their own (what the tensor-core products read), with each
    row's sum of squares from `sum_squares`."""
    x32 = x.float()
    if not materialize:
        return (x32 * (x32.square().mean(-1, keepdim=True) + eps).rsqrt()).cast(weight.dtype) * weight
    inv_rms = (sum_squares(x32) / x.shape[-1] + eps).rsqrt()
    return ((x32 * inv_rms).cast(weight.dtype) * weight).contiguous()


def _sum_squares_kernel(out: UOp, x: UOp, threads: int) -> UOp:
    """out[r] = sum over d of x[r, d]^2, with `threads` lanes per row on GPUs (GROUP: lane t reads d = t, t +
    threads, ..., so a warp's loads are consecutive) and a plain loop per row where there are no lanes."""
    rows, D = x.shape
    r, d = UOp.range(rows, 0), UOp.range(D, 1, AxisType.REDUCE)
    v = x[r, d]
    opts = (Opt(OptOps.GROUP, 0, threads),) if threads > 1 else ()
    return out[r].store((v * v).reduce(d, arg=Ops.ADD)).end(r).sink(
        arg=KernelInfo(name=f"sum_squares_{D}", opts_to_apply=opts))


def sum_squares(x: Tensor) -> Tensor:
    """(..., D) float32 -> (..., 1): each row's sum of squares, one workgroup per row. tinygrad's heuristics gave
    this reduction a launch shape that put 16 rows on each of a few workgroups: RMSNorm's reduction at 64 rows took
    21 us on the H200 (45 of them a step, 0.96 ms of 5.9), for 512 KB."""
    *lead, D = x.shape
    rows = math.prod(lead)
    threads = 256 if Device[x.device].renderer.has_local else 1
    while threads > 1 and D % threads:
        threads //= 2
    out = Tensor.empty(rows, dtype=dtypes.float32, device=x.device)
    out = out.custom_kernel(x.reshape(rows, D), fxn=functools.partial(_sum_squares_kernel, threads=threads))[0]
    return out.reshape(*lead, 1)


def _norm_project_kernel(out: UOp, x: UOp, g: UOp, w: UOp, eps: float) -> UOp:
    """out[r, n] = inv_rms(x[r]) * sum over k of x[r, k] g[k] w[n, k]: rms_norm(x) @ w.T with the row's scale
    applied after the sum (equal up to rounding). Both of the kernel's reductions (the row's sum of squares and the
    product) run over the same range k, so tinygrad's optimisations (GROUP lanes on k, rows per workgroup) apply to
    both alike, and every workgroup computes its row's scale for itself: a few dozen loads from cache instead of a
    kernel. (Scaling inside the product's sum, a reduction of a reduction over one range, sends tinygrad 0.14's
    rewrite into an endless loop.)"""
    rows, K = x.shape
    N = w.shape[0]
    r, n, k = UOp.range(rows, 0), UOp.range(N, 1), UOp.range(K, 2, AxisType.REDUCE)
    xv = x[r, k]
    dot = (xv * g[k].cast(dtypes.float) * w[n, k].cast(dtypes.float)).reduce(k, arg=Ops.ADD)
    inv_rms = ((xv * xv).reduce(k, arg=Ops.ADD) * (1.0 / K) + eps).rsqrt()
    return out[r, n].store((dot * inv_rms).cast(out.dtype)).end(r, n).sink(arg=KernelInfo(name=f"norm_project_{N}_{K}"))


def norm_project(x: Tensor, norm_weight: Tensor, w: Tensor, eps: float) -> Tensor:
    """rms_norm(x, norm_weight) @ w.T in one kernel, for matrix-vector work (fewer than 16 rows): without it each
    of the 45 norms of a TinyLlama batch-1 step was a kernel of its own (`r_16_128`), launch-bound. x (..., K) in
    float32; the result (..., N) in w's dtype. Its launch shape comes from the tuning table like any kernel's."""
    *lead, K = x.shape
    rows = math.prod(lead)
    out = Tensor.empty(rows, w.shape[0], dtype=w.dtype, device=x.device)
    out = out.custom_kernel(x.reshape(rows, K), norm_weight, w,
                            fxn=functools.partial(_norm_project_kernel, eps=eps))[0]
    return out.reshape(*lead, w.shape[0])


def project(x: Tensor, w: Tensor, split: int = 1) -> Tensor:
    """x (..., K) @ w.T for a weight w (N, K): fp16 inputs, fp32 accumulation, result in x's dtype.

    split > 1 computes `split` partial products over K / split each, then sums them (split-K). tinygrad keeps a
    tensor-core kernel's whole reduction in one thread's loop, so with few rows a product runs on a handful of
    workgroups that each wait on global loads; split-K gives the GPU that many times more of them. On an H200 the
    batch-64 down projection took 304 us as one product and 53 us split 8 ways (`python -m bench.gemm`)."""
    if split == 1:
        return x @ w.T
    *lead, K = x.shape
    parts = x.reshape(*lead, 1, split, K // split) * w.reshape(w.shape[0], split, K // split)
    return parts.sum(-1, dtype=dtypes.float).contiguous().sum(-1).cast(x.dtype)


def split_k_for_tensor_cores(rows: int, K: int, N: int) -> int:
    """How many ways to split a (rows x K) @ (K x N) product: the largest power of two up to 8 that keeps
    rows * N * split at or under 2M output partials, with K / split a multiple of the tensor cores' K (16).
    Fitted to `python -m bench.gemm` on an H200 (TinyLlama's four projections at 16-2048 rows): it picks the
    measured best, or one within 25% of it, at every point; 2,048 rows stay whole."""
    if rows < 16:
        return 1  # matrix-vector work: not a tensor-core kernel
    split = 1
    while split < 8 and rows * N * split * 2 <= 1 << 21 and K % (split * 2 * 16) == 0:
        split *= 2
    return split


class LlamaModel:
    """Weights plus the KV cache; `logits` is the traced computation that the runner captures per bucket."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, cache: PagedKVCache, max_context: int):
        self.config, self.weights, self.cache = config, weights, cache
        self.max_context = max_context
        self.max_blocks_per_seq = math.ceil(max_context / cache.block_size)
        device = weights.embed.device
        # split-K only where products run on tensor cores (CUDA, Metal); elsewhere a product stays one kernel
        self.split_k: Callable[[int, int, int], int] = (
            split_k_for_tensor_cores if Device[device].renderer.tensor_cores else (lambda rows, K, N: 1))
        # the custom tensor-core kernel where the device has its layout (CUDA); None: tinygrad's own product
        self.gemm_plan: Callable[[int, int, int], tc_gemm.GemmPlan | None] = (
            tc_gemm.plan_for if tc_gemm.supports(device) else (lambda rows, K, N: None))
        # one row (batch-1 decode): worker_svc.gemv's kernels where the device has local memory (GPUs)
        self.has_local = bool(Device[device].renderer.has_local)
        freqs = np.outer(np.arange(max_context, dtype=np.float64), np.array(config.rope_inv_freq(), dtype=np.float64))
        self.rope_cos = Tensor(np.cos(freqs).astype(np.float32), device=device).realize()
        self.rope_sin = Tensor(np.sin(freqs).astype(np.float32), device=device).realize()

    def hidden_states(self, tokens: Tensor, positions: Tensor, slots: Tensor, block_tables: Tensor,
                      num_blocks: UOp | int, table_offset: int = 0) -> Tensor:
        """tokens, positions, slots: (B, T) int32; block_tables: (B, table_offset + W) int32, the tables in its
        columns from table_offset on. Returns the residual stream (B, T, D) in float32, before the final norm
        (`logits` applies it to the rows it keeps)."""
        cfg, w = self.config, self.weights
        B, T = tokens.shape
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim = H * hd

        # With 16 rows or more, matrix products read plain buffers: with a norm or SiLU fused into its input, a
        # tensor-core kernel recomputes that input for every tile of output columns (on the H200 the batch-64 down
        # projection ran at 50 GB/s that way). Fewer rows are matrix-vector work, where the fused input costs
        # little and the extra kernels (2 or 3 per layer) would cost a launch each.
        many = B * T >= 16
        x = w.embed[tokens].float()  # residual stream in fp32
        flat_slots, flat_positions = slots.reshape(B * T), positions.reshape(B * T)
        # one fused kernel per layer rotates q and reads K and V in place through the block table. A prefill
        # chunk's T tokens are T query rows of that kernel sharing their sequence's table row: causal attention is
        # each token's own position mask, and the chunk's keys are in the pool before it runs (cache.write)
        def attention(qkv: Tensor, pool: Tensor) -> Tensor:
            """qkv: the QKV product's (B * T, N) rows, or (S, B * T, N) partial products of them."""
            out = paged_decode_attention(qkv, pool, block_tables, flat_positions, num_blocks,
                                         self.cache.block_size, KV, hd, num_heads=H,
                                         rope=(self.rope_cos, self.rope_sin), out_dtype=self.cache.dtype,
                                         queries_per_table=T, table_offset=table_offset)
            return out.reshape(B, T, q_dim)

        eps = cfg.rms_norm_eps
        # one row: each product is a worker_svc.gemv kernel with the norm before it, or the SwiGLU before and the
        # residual add after it, fused in: 5 kernels a layer (norm_project's path: 6)
        if B * T == 1 and self.gemv_fits():
            D = x.shape[-1]
            x = x.reshape(D)
            for i, layer in enumerate(w.layers):
                # the QKV kernel also writes the token's rope(K) and V into the pool (no separate write kernel)
                qkv, pool = gemv.gemv_qkv(x, layer.wqkv, self.gemv_plan(layer.wqkv), (layer.attn_norm, eps),
                                          self.cache.pools[i], (self.rope_cos, self.rope_sin), flat_positions,
                                          flat_slots, q_dim, hd)
                attn = attention(qkv.reshape(1, -1), pool).reshape(q_dim)
                x = gemv.gemv(attn, layer.wo, self.gemv_plan(layer.wo), residual=x)
                gate_up = gemv.gemv(x, layer.w_gate_up, self.gemv_plan(layer.w_gate_up), norm=(layer.mlp_norm, eps))
                x = gemv.gemv(gate_up, layer.w_down, self.gemv_plan(layer.w_down), swiglu=True, residual=x)
            return x.reshape(B, T, D)

        if not many:  # 2-15 rows: matrix-vector work, each norm fused into the product after it
            for i, layer in enumerate(w.layers):
                qkv = norm_project(x, layer.attn_norm, layer.wqkv, eps).reshape(B * T, -1)
                pool = self.cache.write(i, qkv, q_dim, self.rope_cos, self.rope_sin, flat_positions, flat_slots)
                x = x + self.project(attention(qkv, pool), layer.wo).float()
                gate, up = norm_project(x, layer.mlp_norm, layer.w_gate_up, eps).chunk(2, dim=-1)
                x = x + self.project(gate.silu() * up, layer.w_down).float()
            return x

        # 16 rows and more: the products read plain buffers, and their split-K partials are added up by the kernels
        # that read them: the K/V write and attention (QKV), worker_svc.residual_norm (O, down: each residual add
        # is one kernel with the norm after it), the SwiGLU (gate/up)
        layers = w.layers
        h = rms_norm(x, layers[0].attn_norm, eps, materialize=True)
        for i, layer in enumerate(layers):
            qkv = self.partial_products(h, layer.wqkv)
            pool = self.cache.write(i, qkv, q_dim, self.rope_cos, self.rope_sin, flat_positions, flat_slots)
            attn = attention(qkv, pool)  # (B, T, q_dim) in the weights' dtype, ready for the output projection
            x, h = residual_norm(x, self.partial_products(attn, layer.wo), layer.mlp_norm, eps)
            # SwiGLU straight from the gate/up product's partials: one kernel sums gate's and up's (a summed
            # product that both halves read is a kernel of its own)
            gate_up = self.partial_products(h, layer.w_gate_up)
            inter = gate_up.shape[-1] // 2
            gate, up = (part.sum(0, dtype=dtypes.float) for part in (gate_up[..., :inter], gate_up[..., inter:]))
            down = self.partial_products((gate.silu() * up).cast(h.dtype).contiguous(), layer.w_down)
            if i + 1 < len(layers):
                x, h = residual_norm(x, down, layers[i + 1].attn_norm, eps)
            else:  # the final norm runs in last_logits, on the rows it keeps
                x = x + down.sum(0, dtype=dtypes.float).reshape(x.shape)
        return x

    def gemv_plan(self, weight: Tensor) -> gemv.GemvPlan | None:
        """worker_svc.gemv's plan for a one-row product with this (N, K) weight; None on devices without local
        memory or where its chunks do not fit K."""
        return gemv.plan_for(*weight.shape, lanes=gemv.lanes_for(weight.device)) if self.has_local else None

    def gemv_fits(self) -> bool:
        """Whether every product of a one-row step (and the LM head) has a gemv plan, and the QKV one can write K
        and V into the pool."""
        layer = self.weights.layers[0]
        if any(self.gemv_plan(t) is None
               for t in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down, self.weights.lm_head)):
            return False
        return gemv.kv_write_fits(self.gemv_plan(layer.wqkv), layer.wqkv.shape[0], self.config.head_dim)

    def tc_plan(self, h: Tensor, weight: Tensor) -> tc_gemm.GemmPlan | None:
        """The custom tensor-core kernel's plan for h (..., K) @ weight.T, or None where the device, the dtypes or
        the shape rule it out."""
        rows, (N, K) = math.prod(h.shape[:-1]), weight.shape
        return self.gemm_plan(rows, K, N) if h.dtype == weight.dtype == dtypes.half else None

    def project(self, h: Tensor, weight: Tensor, split: bool = True) -> Tensor:
        """h (..., K) @ weight.T for 16 rows and more: the custom tensor-core kernel (worker_svc.tc_gemm) where the
        device and dtypes allow and a plan fits, else tinygrad's product (split over K on devices with tensor
        cores, unless `split` is off)."""
        plan = self.tc_plan(h, weight)
        if plan is not None:
            return tc_gemm.tc_project(h, weight, plan)
        rows, (N, K) = math.prod(h.shape[:-1]), weight.shape
        return project(h, weight, self.split_k(rows, K, N) if split else 1)

    def partial_products(self, h: Tensor, weight: Tensor) -> Tensor:
        """h (..., K) @ weight.T as partial products over K, (S, rows, N), for the kernels that read the product to
        add up (the K/V write, attention, worker_svc.residual_norm, the SwiGLU): the tensor-core kernel's split-K
        partials as they are, or one whole product (S = 1)."""
        plan = self.tc_plan(h, weight)
        rows, K = math.prod(h.shape[:-1]), h.shape[-1]
        if plan is not None:
            return tc_gemm.tc_partials(h.reshape(rows, K), weight, plan)
        return self.project(h, weight).reshape(1, rows, weight.shape[0])

    def logits(self, tokens: Tensor, positions: Tensor, slots: Tensor, block_tables: Tensor,
               num_blocks: UOp | int, last_index: Tensor | None = None, table_offset: int = 0) -> Tensor:
        """fp32 logits (B, V) of each row's token at `last_index` (B,), or of its only token when T == 1."""
        hidden = self.hidden_states(tokens, positions, slots, block_tables, num_blocks, table_offset)
        return self.last_logits(hidden, last_index)

    def last_logits(self, hidden: Tensor, last_index: Tensor | None = None) -> Tensor:
        """fp32 logits (B, V) of the residual stream (B, T, D) at `last_index` (B,), or T == 1's only one. The rows
        are picked before the final norm, which then runs on B rows, not B * T."""
        B, T, D = hidden.shape
        if T == 1:
            last = hidden.reshape(B, D)
        else:
            assert last_index is not None
            pick = Tensor.arange(T).reshape(1, T) == last_index.reshape(B, 1)
            # from a stored residual stream: picked from the expression, tinygrad fused the last layer's down
            # projection into this reduction (the 16x128 prefill went from 42 to 93 ms on the H200)
            last = pick.reshape(B, T, 1).where(hidden.contiguous(), 0).sum(1)
        w, eps = self.weights, self.config.rms_norm_eps
        if B == 1 and self.gemv_fits():
            # fp32 straight from the kernel: a half result's cast was a kernel of its own
            logits = gemv.gemv(last.reshape(D), w.lm_head, self.gemv_plan(w.lm_head), norm=(w.norm, eps),
                               out_dtype=dtypes.float)
            return logits.reshape(1, -1)
        if B < 16:
            return norm_project(last, w.norm, w.lm_head, eps).float()
        return self.project(rms_norm(last, w.norm, eps, materialize=True), w.lm_head, split=False).float()

    def all_logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits (B, T, V) of every position of the residual stream (B, T, D): what prompt logprobs read."""
        B, T, D = hidden.shape
        normed = rms_norm(hidden, self.weights.norm, self.config.rms_norm_eps, materialize=B * T >= 16)
        return (normed @ self.weights.lm_head.T).float()
