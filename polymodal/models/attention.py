"""One attention function over several kernels: torch SDPA (flash, memory-efficient, cuDNN, math), nested jagged
tensors through SDPA, FlexAttention, xformers, flash-attn, torch's varlen kernel, and a float64 reference.

Layouts:
- padded: q `[B, H, Lq, D]`, k and v `[B, H, Lk, D]`, optional `mask` broadcastable to `[B, H, Lq, Lk]` (bool:
  True attends; float: added to the scores) or a key-padding mask `[B, Lk]`;
- packed: q `[Tq, H, D]`, k and v `[Tk, H, D]` with `cu_seqlens_q` (and `cu_seqlens_k`, default the same): the
  cumulative sequence lengths `[0, l0, l0+l1, ...]`. Sequence i of q attends only to sequence i of k, so packed
  cross-attention (a 4M decoder's targets to its own sample's encoder tokens) is the same call. A 4M-style
  modality-separated mask is packing too: make every (sample, modality) run its own sequence, and pass `causal`
  as one bool per sequence (True for sequence modalities).

`backend="auto"` picks by this rule (logged once per device, dtype and layout):
- padded: `sdpa` (torch then chooses its flash / memory-efficient / cuDNN / math kernel);
- packed on CUDA in fp16/bf16: `flash` if flash-attn is installed and works, else torch's `varlen`, else `xformers`
  if its kernels work here, else `nested` (not causal) or `sdpa`;
- packed on CPU: `sdpa`, each sequence padded to the longest one in the batch with a key-padding mask, which
  torch's CPU flash kernel takes. benchmarks/attention.py measured it against nested jagged tensors (which run
  torch's math path per sequence on CPU: 6.7x slower and 19x the memory on 4M-like batches) and against one
  block-diagonal mask over the whole pack (5.8x slower);
- on CPU in bf16 with at most `MATMUL_MAX_KEYS` keys per sequence (padded or packed): `matmul`, the scores and
  the weighted sum as two plain bf16 matrix products with the softmax in float32. Torch's CPU flash kernel is
  slow in bf16 (its backward above all): on a CPU with AVX512-BF16, forward + backward of MultiMAE's and 4M's
  short sequences (33-64 keys) ran 4-6x faster this way; from about 160 keys on, flash is faster again.
`flex` is never chosen automatically (it pays off for masks the others cannot express, and compiles on first use).

Forcing a backend that is absent or cannot run the request is an `AttentionError` that says what to install or
which backend to use instead; nothing falls back silently. `usable_backends(device)` probes each one with a tiny
real call (`polymodal info` prints it).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from polymodal.data.errors import ConfigError

log = logging.getLogger("polymodal")

SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
BACKENDS = ("auto", "math", "matmul", "sdpa", *SDPA_KERNELS, "nested", "flex", "xformers", "flash", "varlen")
# Up to this many keys per sequence, `auto` runs bf16 attention on CPU as two matrix products (module docstring):
# the crossover measured at head size 32 lies between 128 (1.4x faster than flash) and 192 keys (1.9x slower).
MATMUL_MAX_KEYS = 128
INSTALL = {"xformers": "pip install 'polymodal[xformers]' (xformers; its kernels need a CUDA build matching torch's)",
           "flash": "pip install 'polymodal[flash]' (flash-attn-4, Hopper GPUs; flash-attn 2 has no registry wheel)"}


class AttentionError(ConfigError):
    """Bad input to `attention`, or a backend that cannot run the request (never a silent fallback). A ValueError;
    the CLI prints it as one line, like any configuration mistake (a forced backend usually comes from a config)."""


@dataclass(frozen=True)
class Packing:
    """How a packed batch splits into sequences: what every backend is given (cumulative lengths, longest run)."""
    cu_seqlens: torch.Tensor  # int32 [n + 1], from 0 to the token count
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths) -> Packing:
        lengths = torch.as_tensor(lengths)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(cu, int(lengths.max()) if len(lengths) else 0)

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens.diff()

    def sequence_ids(self) -> torch.Tensor:
        """Each token's sequence index (computed once per packing: padding q, k, v and unpadding all use it)."""
        return self._sequence_ids

    def positions(self) -> torch.Tensor:
        """Each token's position inside its own sequence."""
        return self._positions

    @functools.cached_property
    def _sequence_ids(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=self.cu_seqlens.device),
                                       self.lengths.long(), output_size=int(self.cu_seqlens[-1]))

    @functools.cached_property
    def _positions(self) -> torch.Tensor:
        ids = self._sequence_ids
        return torch.arange(len(ids), device=ids.device) - self.cu_seqlens[:-1].long()[ids]


@dataclass
class _Request:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    mask: torch.Tensor | None
    packed_q: Packing | None
    packed_k: Packing | None
    dropout_p: float
    scale: float

    @property
    def packed(self) -> bool:
        return self.packed_q is not None

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal=False, mask: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, dropout_p: float = 0.0,
              scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention, padded or packed (see the module docstring). Returns q's layout with v's
    head size. `causal` is a bool, or for packed input a bool tensor with one entry per sequence."""
    if backend not in BACKENDS:
        raise AttentionError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    req = _check(q, k, v, causal, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale)
    if isinstance(req.causal, torch.Tensor):  # some sequences causal, some not: each group in its own call
        return _split_by_causality(req, backend)
    return _run(req, backend)


def _run(req: _Request, backend: str) -> torch.Tensor:
    if backend == "auto":
        keys = req.packed_k.max_seqlen if req.packed else req.k.shape[-2]
        backend = choose_backend(req.q.device, req.q.dtype, req.packed, bool(req.causal), req.mask is not None,
                                 keys)
    return _KERNELS[backend.split("-")[0] if backend.startswith("sdpa") else backend](req, backend)


def choose_backend(device: torch.device, dtype: torch.dtype, packed: bool, causal: bool, masked: bool,
                   keys: int | None = None) -> str:
    """The documented `auto` rule (module docstring), logged once per case; `keys`: the longest key sequence."""
    choice = "sdpa"
    if device.type == "cpu" and dtype == torch.bfloat16 and keys is not None and keys <= MATMUL_MAX_KEYS:
        choice = "matmul"
    elif packed and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        usable = usable_backends(str(device))
        choice = next((b for b in ("flash", "varlen", "xformers") if usable[b].startswith("yes")),
                      "sdpa" if causal else "nested")
    elif packed and device.type != "cpu":
        choice = "sdpa" if causal else "nested"
    _log_choice(device.type, str(dtype).removeprefix("torch."), "packed" if packed else "padded",
                "causal" if causal else "full", choice)
    return choice


@functools.cache
def _log_choice(device: str, dtype: str, layout: str, causal: str, choice: str) -> None:
    log.info("attention: backend %s for %s %s %s input on %s", choice, layout, causal, dtype, device)


# ---------------------------------------------------------------------------------------------------- input checks

def _check(q, k, v, causal, mask, cu_q, cu_k, max_q, max_k, dropout_p, scale) -> _Request:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise AttentionError("q, k and v must be tensors")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionError(f"q, k and v must share a dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise AttentionError(f"q, k and v must be on one device (got {q.device}, {k.device}, {v.device})")
    if not q.is_floating_point():
        raise AttentionError(f"attention needs floating-point q, k, v (got {q.dtype})")
    if q.shape[-1] != k.shape[-1]:
        raise AttentionError(f"q and k head dimensions differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise AttentionError(f"k and v must match in all but the head dimension (got {tuple(k.shape)} and "
                             f"{tuple(v.shape)})")
    if not 0.0 <= dropout_p < 1.0:
        raise AttentionError(f"dropout_p must be in [0, 1) (got {dropout_p})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    packed = cu_q is not None or cu_k is not None
    if packed:
        if q.dim() != 3 or k.dim() != 3:
            raise AttentionError(f"packed input is q, k, v of shape [tokens, heads, head_dim] (got q "
                                 f"{tuple(q.shape)}, k {tuple(k.shape)})")
        if mask is not None:
            raise AttentionError("packed input takes no mask: describe the sequences with cu_seqlens (a 4M-style "
                                 "modality-separated mask is one sequence per sample and modality)")
        if cu_q is None:
            raise AttentionError("cu_seqlens_k was given without cu_seqlens_q")
        pq = _packing(cu_q, max_q, q.shape[0], "cu_seqlens_q")
        pk = pq if cu_k is None else _packing(cu_k, max_k, k.shape[0], "cu_seqlens_k")
        if cu_k is None and k.shape[0] != q.shape[0]:
            raise AttentionError(f"k has {k.shape[0]} tokens and q {q.shape[0]}: give cu_seqlens_k for packed "
                                 "cross-attention")
        if len(pq.lengths) != len(pk.lengths):
            raise AttentionError(f"cu_seqlens_q describes {len(pq.lengths)} sequences and cu_seqlens_k "
                                 f"{len(pk.lengths)}; they must pair up")
        if bool(((pk.lengths == 0) & (pq.lengths > 0)).any()):
            raise AttentionError("a sequence has queries but no keys (cu_seqlens_k gives it length 0)")
    else:
        pq = pk = None
        if q.dim() != 4 or k.dim() != 4:
            raise AttentionError(f"padded input is q, k, v of shape [batch, heads, length, head_dim] (got q "
                                 f"{tuple(q.shape)}, k {tuple(k.shape)}); packed input needs cu_seqlens_q")
        if q.shape[:2] != k.shape[:2]:
            raise AttentionError(f"q and k differ in batch or heads: {tuple(q.shape[:2])} vs {tuple(k.shape[:2])}")
        mask = _check_mask(mask, q, k)
    if packed and q.shape[1] != k.shape[1]:
        raise AttentionError(f"q has {q.shape[1]} heads and k {k.shape[1]}")
    causal = _check_causal(causal, packed, pq, pk, q, k)
    return _Request(q, k, v, causal, mask, pq, pk, float(dropout_p), scale)


def _packing(cu, max_len, tokens: int, name: str) -> Packing:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or len(cu) < 2:
        raise AttentionError(f"{name} must be a 1-D int32/int64 tensor [0, l0, l0+l1, ...] with at least 2 entries")
    lengths = cu.diff()
    if int(cu[0]) != 0 or bool((lengths < 0).any()):
        raise AttentionError(f"{name} must start at 0 and never decrease (got {cu.tolist()[:8]}...)")
    if int(cu[-1]) != tokens:
        raise AttentionError(f"{name} ends at {int(cu[-1])} but the tensor holds {tokens} tokens")
    longest = int(lengths.max())
    if max_len is not None and int(max_len) < longest:
        raise AttentionError(f"max_seqlen for {name} is {max_len} but its longest sequence has {longest} tokens")
    return Packing(cu.to(torch.int32), longest if max_len is None else int(max_len))


def _check_mask(mask, q, k):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise AttentionError("mask must be a bool tensor (True attends) or a float tensor (added to the scores)")
    mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if mask.dim() == 2:  # key padding [B, Lk]
        if tuple(mask.shape) != (B, Lk):
            raise AttentionError(f"a 2-D mask is a key-padding mask of shape [batch, Lk] = [{B}, {Lk}] (got "
                                 f"{tuple(mask.shape)})")
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or any(m not in (1, want) for m, want in zip(mask.shape, (B, H, Lq, Lk))):
        raise AttentionError(f"mask of shape {tuple(mask.shape)} does not broadcast to [batch, heads, Lq, Lk] = "
                             f"[{B}, {H}, {Lq}, {Lk}]")
    return mask


def _check_causal(causal, packed, pq, pk, q, k):
    if isinstance(causal, torch.Tensor):
        if not packed:
            raise AttentionError("a per-sequence causal tensor needs packed input (cu_seqlens_q)")
        if causal.dtype != torch.bool or tuple(causal.shape) != (len(pq.lengths),):
            raise AttentionError(f"causal as a tensor is one bool per sequence: shape [{len(pq.lengths)}] "
                                 f"(got {causal.dtype} {tuple(causal.shape)})")
        if bool(causal.all()) or not bool(causal.any()):
            causal = bool(causal.all()) if len(causal) else False
        elif not torch.equal(pq.lengths[causal], pk.lengths[causal]):
            raise AttentionError("causal sequences need as many keys as queries")
        return causal
    causal = bool(causal)
    if causal and (not torch.equal(pq.lengths, pk.lengths) if packed else q.shape[-2] != k.shape[-2]):
        raise AttentionError("causal attention needs as many keys as queries in every sequence")
    return causal


def _split_by_causality(req: _Request, backend: str) -> torch.Tensor:
    """Run the causal sequences and the others as two packed calls and put the rows back in place."""
    out = req.q.new_empty(req.q.shape[0], req.q.shape[1], req.v.shape[-1])
    for flag in (True, False):
        keep = req.causal == flag
        rows_q, pq = _select(req.packed_q, keep)
        rows_k, pk = _select(req.packed_k, keep)
        part = _Request(req.q[rows_q], req.k[rows_k], req.v[rows_k], flag, None, pq, pk, req.dropout_p, req.scale)
        out = out.index_copy(0, rows_q, _run(part, backend))
    return out


def _select(packing: Packing, keep: torch.Tensor) -> tuple[torch.Tensor, Packing]:
    rows = torch.nonzero(keep[packing.sequence_ids()], as_tuple=True)[0]
    return rows, Packing.from_lengths(packing.lengths[keep])


# ------------------------------------------------------------------------------------------------------- kernels

def _math(req: _Request, backend: str) -> torch.Tensor:
    """The reference: explicit scores, a dense mask and softmax in at least float32 (float64 stays float64)."""
    compute = torch.promote_types(req.q.dtype, torch.float32)
    q, k, v = (t.to(compute) for t in (req.q, req.k, req.v))
    if req.packed:  # [T, H, D] -> one [1, H, T, D] sequence with a block-diagonal mask
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        same = req.packed_q.sequence_ids()[:, None] == req.packed_k.sequence_ids()[None, :]
        if req.causal:
            same &= req.packed_q.positions()[:, None] >= req.packed_k.positions()[None, :]
        mask = same[None, None]
    else:
        mask = _and_causal(req.mask, q, k) if req.causal else req.mask
    scores = (q @ k.transpose(-1, -2)) * req.scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
    weights = F.dropout(scores.softmax(-1), req.dropout_p) if req.dropout_p else scores.softmax(-1)
    out = weights @ v
    out = out[0].transpose(0, 1) if req.packed else out
    return out.to(req.q.dtype)


def _matmul(req: _Request, backend: str) -> torch.Tensor:
    """Two matrix products in the input dtype, the softmax in float32 (bf16 scores keep 3 significant digits);
    packed input is padded per sequence as for `sdpa`. Written out rather than SDPA's math kernel, which computes
    everything in float32 on CPU and so loses the bf16 products' speed (measured 2x slower than this)."""
    q, k, v, mask = _padded(req) if req.packed else (req.q, req.k, req.v, req.mask)
    mask = _and_causal(mask, q, k) if req.causal else mask
    scores = (q @ k.transpose(-1, -2)).float() * req.scale
    if mask is not None:
        # A finite floor, not -inf: the padded rows of a sequence with no keys stay finite (they are dropped, but a
        # NaN there would reach the keys' gradients through the backward of the product).
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask.float()
    weights = scores.softmax(-1).to(v.dtype)
    out = (F.dropout(weights, req.dropout_p) if req.dropout_p else weights) @ v
    return _unpad(out, req.packed_q, _uniform(req.q, req.packed_q)) if req.packed else out


def _sdpa(req: _Request, backend: str) -> torch.Tensor:
    """torch SDPA; `sdpa-<kernel>` restricts torch to one kernel. Packed input is padded per sequence with a
    key-padding (and causal) mask, then unpadded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, mask = _padded(req) if req.packed else (req.q, req.k, req.v, req.mask)
    causal = req.causal
    if causal and mask is not None:  # SDPA takes one or the other (equal packed lengths need no mask at all)
        mask, causal = _and_causal(mask, q, k), False
    kernels = [getattr(SDPBackend, SDPA_KERNELS[backend])] if backend in SDPA_KERNELS else list(
        getattr(SDPBackend, name) for name in SDPA_KERNELS.values())
    try:
        with sdpa_kernel(kernels):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=req.dropout_p, is_causal=causal,
                                                 scale=req.scale)
    except RuntimeError as exc:
        if backend not in SDPA_KERNELS:
            raise
        raise AttentionError(f"attention backend {backend!r} cannot run this request on {q.device.type} "
                             f"({q.dtype}, {'masked' if mask is not None else 'unmasked'}): torch says "
                             f"{str(exc).splitlines()[0]}; use backend 'sdpa' to let torch choose") from None
    return _unpad(out, req.packed_q, _uniform(req.q, req.packed_q)) if req.packed else out


def _and_causal(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`mask` (bool: True attends; float: added) combined with the causal mask, aligned top-left as SDPA's."""
    lower = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is None:
        return lower
    return mask & lower if mask.dtype == torch.bool else mask.masked_fill(~lower, float("-inf"))


def _padded(req: _Request) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Packed q, k, v padded per sequence to `[n, H, max_len, D]`, with the key-padding mask (None when every
    sequence is as long as the longest)."""
    q, k, v = _pad(req.q, req.packed_q), _pad(req.k, req.packed_k), _pad(req.v, req.packed_k)
    mask = None if _uniform(req.k, req.packed_k) else (
        torch.arange(k.shape[2], device=k.device)[None] < req.packed_k.lengths[:, None])[:, None, None]
    return q, k, v, mask


def _uniform(x: torch.Tensor, packing: Packing) -> bool:
    """Whether every packed sequence has the longest one's length (known from shapes alone, with no device sync):
    then padding is a reshape and needs no mask (MultiMAE's decoder queries, a fixed visible count)."""
    return x.shape[0] == (len(packing.cu_seqlens) - 1) * packing.max_seqlen


def _pad(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """[T, H, D] -> [n, H, max_len, D], zeros after each sequence."""
    if _uniform(x, packing):
        return x.view(-1, packing.max_seqlen, *x.shape[1:]).transpose(1, 2)
    out = x.new_zeros(len(packing.lengths), packing.max_seqlen, *x.shape[1:])
    out = out.index_put((packing.sequence_ids(), packing.positions()), x)
    return out.transpose(1, 2)


def _unpad(x: torch.Tensor, packing: Packing, uniform: bool = False) -> torch.Tensor:
    """[n, H, max_len, D] -> [T, H, D]; `uniform`: every sequence is max_len long (see `_uniform`)."""
    if uniform:
        return x.transpose(1, 2).flatten(0, 1)
    return x.transpose(1, 2)[packing.sequence_ids(), packing.positions()]


def _nested(req: _Request, backend: str) -> torch.Tensor:
    """Nested jagged tensors through SDPA: no padding at all (forward and backward, CPU and CUDA)."""
    if not req.packed:
        raise AttentionError("backend 'nested' takes packed input ([tokens, heads, head_dim] with cu_seqlens_q); "
                             "use 'sdpa' for padded batches")
    if req.causal and req.q.device.type == "cpu":
        raise AttentionError(f"torch {torch.__version__}'s nested SDPA fails on causal input on CPU; use backend "
                             "'sdpa' (or 'auto') for causal packed attention here")

    def jagged(x, packing):
        # contiguous: with strided views (q, k, v split from one projection) torch 2.14's nested SDPA on CPU asks
        # the cuDNN checker, which fails without a CUDA driver
        return torch.nested.nested_tensor_from_jagged(x.contiguous(), offsets=packing.cu_seqlens.long(),
                                                      max_seqlen=max(packing.max_seqlen, 1)).transpose(1, 2)

    with warnings.catch_warnings():  # torch's note that nested tensors are a prototype API
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
        out = F.scaled_dot_product_attention(jagged(req.q, req.packed_q), jagged(req.k, req.packed_k),
                                             jagged(req.v, req.packed_k), dropout_p=req.dropout_p,
                                             is_causal=req.causal, scale=req.scale)
    return out.transpose(1, 2).values()


def _flex(req: _Request, backend: str) -> torch.Tensor:
    """FlexAttention with a block mask: sequences (and causality) for packed input, the given mask for padded."""
    from torch.nn.attention.flex_attention import create_block_mask

    if req.needs_grad and req.q.device.type == "cpu":
        raise AttentionError("backend 'flex' has no backward on CPU (torch's FlexAttention is inference-only "
                             "there); use 'nested' or 'sdpa' to train, or run it under torch.no_grad()")
    if req.dropout_p:
        raise AttentionError("backend 'flex' has no attention dropout; use 'sdpa' or set dropout_p=0")
    q, k, v, score_mod = req.q, req.k, req.v, None
    if q.device.type == "cpu":  # torch refuses CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    if req.packed:
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        seq_q, seq_k = req.packed_q.sequence_ids(), req.packed_k.sequence_ids()
        pos_q, pos_k = req.packed_q.positions(), req.packed_k.positions()
        if req.causal:
            def mask_mod(b, h, i, j):
                return (seq_q[i] == seq_k[j]) & (pos_q[i] >= pos_k[j])
        else:
            def mask_mod(b, h, i, j):
                return seq_q[i] == seq_k[j]
        batch, heads = None, None
    else:
        mask, causal = req.mask, req.causal
        if mask is not None and mask.dtype != torch.bool:  # an additive float mask is a score modification
            score_mod, mask = _additive_score_mod(mask), None
        if mask is None and not causal:
            mask_mod = None
        else:
            full = mask

            def mask_mod(b, h, i, j):
                keep = (i >= j) if causal else (i >= 0)
                if full is not None:
                    keep = keep & full[b if full.shape[0] > 1 else 0, h if full.shape[1] > 1 else 0,
                                       i if full.shape[2] > 1 else 0, j if full.shape[3] > 1 else 0]
                return keep
        batch = None if mask is None or mask.shape[0] == 1 else q.shape[0]
        heads = None if mask is None or mask.shape[1] == 1 else q.shape[1]
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, batch, heads, q.shape[-2], k.shape[-2],
                                                                  device=q.device)
    out = _flex_function(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=req.scale)
    return out[0].transpose(0, 1) if req.packed else out


def _additive_score_mod(bias: torch.Tensor) -> Callable:
    """An additive float mask [B|1, H|1, Lq|1, Lk|1] as FlexAttention's score modification."""
    def score_mod(score, b, h, i, j):
        return score + bias[b if bias.shape[0] > 1 else 0, h if bias.shape[1] > 1 else 0,
                            i if bias.shape[2] > 1 else 0, j if bias.shape[3] > 1 else 0]
    return score_mod


@functools.cache
def _flex_function(device_type: str) -> Callable:
    """Compiled on CUDA, where it pays off (its fused kernel); eager elsewhere (CPU inference)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)

    def eager(*args, **kwargs):  # its advice to compile is for speed; CPU flex is a reference/inference path
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)
    return eager


def _xformers(req: _Request, backend: str) -> torch.Tensor:
    ops = _require("xformers", req.q.device)
    from xformers.ops import fmha

    if req.packed:
        kind = fmha.attn_bias.BlockDiagonalCausalMask if req.causal else fmha.attn_bias.BlockDiagonalMask
        bias = kind.from_seqlens(req.packed_q.lengths.tolist(), req.packed_k.lengths.tolist())
        out = ops.memory_efficient_attention(req.q[None], req.k[None], req.v[None], attn_bias=bias,
                                             p=req.dropout_p, scale=req.scale)
        return out[0]
    bias = fmha.attn_bias.LowerTriangularMask() if req.causal and req.mask is None else None
    if req.mask is not None:
        mask = req.mask if req.mask.dtype != torch.bool else torch.zeros_like(
            req.mask, dtype=req.q.dtype).masked_fill(~req.mask, float("-inf"))
        if req.causal:
            mask = mask.masked_fill(~torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril(),
                                    float("-inf"))
        bias = mask.expand(req.q.shape[0], req.q.shape[1], req.q.shape[2], req.k.shape[2])
    out = ops.memory_efficient_attention(*(t.transpose(1, 2) for t in (req.q, req.k, req.v)), attn_bias=bias,
                                         p=req.dropout_p, scale=req.scale)
    return out.transpose(1, 2)


def _flash(req: _Request, backend: str) -> torch.Tensor:
    varlen = _require("flash", req.q.device)
    if req.mask is not None:
        raise AttentionError("backend 'flash' takes no mask: pack the sequences (cu_seqlens) or use 'sdpa'")
    q, k, v = req.q, req.k, req.v
    pq = req.packed_q or Packing(torch.arange(0, q.shape[0] * q.shape[2] + 1, q.shape[2], dtype=torch.int32,
                                              device=q.device), q.shape[2])
    pk = req.packed_k or Packing(torch.arange(0, k.shape[0] * k.shape[2] + 1, k.shape[2], dtype=torch.int32,
                                              device=k.device), k.shape[2])
    if not req.packed:  # [B, H, L, D] -> [B * L, H, D]
        q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (q, k, v))
    out = varlen(q, k, v, pq.cu_seqlens, pk.cu_seqlens, pq.max_seqlen, pk.max_seqlen, req.dropout_p, req.scale,
                 req.causal)
    out = out[0] if isinstance(out, tuple) else out
    return out if req.packed else out.unflatten(0, (req.q.shape[0], req.q.shape[2])).transpose(1, 2)


def _varlen(req: _Request, backend: str) -> torch.Tensor:
    varlen = _require("varlen", req.q.device)
    if not req.packed:
        raise AttentionError("backend 'varlen' takes packed input (cu_seqlens_q); use 'sdpa' for padded batches")
    if req.dropout_p:
        raise AttentionError("backend 'varlen' has no attention dropout; use 'flash', 'nested' or 'sdpa'")
    return varlen(req.q, req.k, req.v, req.packed_q.cu_seqlens, req.packed_k.cu_seqlens, req.packed_q.max_seqlen,
                  req.packed_k.max_seqlen, scale=req.scale, window_size=(-1, 0) if req.causal else (-1, -1))


_KERNELS = {"math": _math, "matmul": _matmul, "sdpa": _sdpa, "nested": _nested, "flex": _flex,
            "xformers": _xformers, "flash": _flash, "varlen": _varlen}


# ---------------------------------------------------------------------------------------- optional kernels, probes

def _require(name: str, device: torch.device):
    """The optional kernel's entry point, or an AttentionError saying what to install or use instead."""
    if name in ("flash", "varlen") and device.type != "cuda":
        raise AttentionError(f"backend {name!r} runs on CUDA only; on {device.type} use 'sdpa' or 'nested'")
    fn, why = _load(name)
    if fn is None:
        raise AttentionError(f"backend {name!r} is not available: {why}")
    return fn


@functools.cache
def _load(name: str):
    try:
        if name == "xformers":
            import xformers.ops as ops
            return ops, ""
        if name == "varlen":
            from torch.nn.attention.varlen import varlen_attn
            return varlen_attn, ""
        try:
            from flash_attn import flash_attn_varlen_func  # flash-attn 2
            return flash_attn_varlen_func, ""
        except ImportError:
            from flash_attn.cute import flash_attn_varlen_func as v4  # flash-attn 4 (Hopper)
            return (lambda q, k, v, cq, ck, mq, mk, p, scale, causal: v4(
                q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, softmax_scale=scale, causal=causal)), ""
    except Exception as exc:  # noqa: BLE001 - an optional import may fail in many ways; report why
        return None, f"{type(exc).__name__}: {exc}; {INSTALL.get(name, 'needs a newer torch')}"


@functools.cache
def usable_backends(device: str = "cpu") -> dict[str, str]:
    """Each backend's status on `device`, from a tiny real call checked against the reference: 'yes',
    'yes (forward only)', or 'no: why'."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3]
    q, k, v = (torch.randn(8, 2, 16, generator=gen).to(dev, dtype) for _ in range(3))
    cu = Packing.from_lengths(lengths).cu_seqlens.to(dev)
    padded = [t.transpose(0, 1)[None, :, :5] for t in (q, k, v)]
    want_packed = attention(q, k, v, cu_seqlens_q=cu, backend="math").float()
    want_padded = attention(*padded, backend="math").float()
    status = {}
    for name in BACKENDS[1:]:
        try:
            packed = name not in SDPA_KERNELS
            args, want = ((q, k, v), want_packed) if packed else (padded, want_padded)
            kw = {"cu_seqlens_q": cu} if packed else {}
            with torch.no_grad():
                got = attention(*args, backend=name, **kw).float()
            if not torch.allclose(got, want, atol=3e-2, rtol=3e-2):
                raise AttentionError(f"wrong result (max error {(got - want).abs().max():.2e})")
            status[name] = "yes"
            if name == "nested":
                try:
                    attention(*args, backend=name, causal=True, **kw)
                except AttentionError:
                    status[name] = "yes (not causal)"
            if name in ("flex", "xformers", "flash", "varlen", "nested"):
                leaf = [t.detach().requires_grad_() for t in args]
                try:
                    attention(*leaf, backend=name, **kw).float().sum().backward()
                except Exception:  # noqa: BLE001 - any failure means no backward here
                    status[name] = "yes (forward only)"
        except Exception as exc:  # noqa: BLE001 - a probe reports whatever went wrong
            status[name] = "no: " + str(exc).splitlines()[0][:300]
    return status


def describe_backends(device: str = "cpu") -> str:
    """One line for a run's start: the usable backends on `device`."""
    status = usable_backends(device)
    usable = [n + s[3:] for n, s in status.items() if s.startswith("yes")]
    return f"attention backends on {device}: {', '.join(usable)}"
