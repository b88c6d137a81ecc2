"""The attention layer: every backend that runs on this machine against the float64 reference, forward and
backward, padded and packed; packed output equals each sequence alone; clear errors for bad input."""

from __future__ import annotations

import logging

import pytest
import torch

from polymodal.models.attention import AttentionError, Packing, attention, usable_backends

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, D = 3, 8
LENGTHS_Q = [5, 1, 0, 9, 4]  # a sample with no tokens of this modality gives a zero-length sequence
LENGTHS_K = [3, 7, 0, 2, 6]


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def run(backend, tensors, dtype, grad=True, **kw):
    """Output and gradients (of a fixed random projection of the output) of one call."""
    q, k, v = leaves(*tensors, dtype=dtype)
    if not grad:
        with torch.no_grad():
            return attention(q, k, v, backend=backend, **kw).double(), []
    out = attention(q, k, v, backend=backend, **kw)
    (out * rand(*out.shape, seed=9).to(out.dtype)).sum().backward()
    return out.double(), [t.grad.double() for t in (q, k, v)]


def padded_case(name):
    B, Lq, Lk = 2, 6, 6 if name in ("causal", "causal-mask") else 7
    q, k, v = rand(B, H, Lq, D, seed=1), rand(B, H, Lk, D, seed=2), rand(B, H, Lk, D, seed=3)
    kw = {}
    if name in ("bool-mask", "causal-mask"):
        mask = rand(B, 1, Lq, Lk, seed=4) > -0.5
        mask[..., 0] = True  # every query keeps a key
        kw["mask"] = mask
    if name == "float-mask":
        kw["mask"] = rand(1, H, Lq, Lk, seed=5)
    if name == "key-padding":
        kw["mask"] = torch.arange(Lk)[None] < torch.tensor([[4], [7]])
    if name.startswith("causal"):
        kw["causal"] = True
    return (q, k, v), kw


def packed_case(name):
    lq = [5] * 4 if name.startswith("uniform") else LENGTHS_Q  # equal lengths: padding is a reshape, no mask
    lk = LENGTHS_K if name in ("cross", "uniform-cross") else lq
    q, k, v = rand(sum(lq), H, D, seed=1), rand(sum(lk), H, D, seed=2), rand(sum(lk), H, D, seed=3)
    kw = {"cu_seqlens_q": Packing.from_lengths(lq).cu_seqlens}
    if name in ("cross", "uniform-cross"):
        lk = [3] * 4 if name == "uniform-cross" else lk
        q, k, v = q, rand(sum(lk), H, D, seed=2), rand(sum(lk), H, D, seed=3)
        kw["cu_seqlens_k"] = Packing.from_lengths(lk).cu_seqlens
    if name in ("causal", "uniform-causal"):
        kw["causal"] = True
    if name == "mixed-causal":  # 4M's decoder: sequence modalities causal, image-token modalities not
        kw["causal"] = torch.tensor([True, False, False, True, False])
    return (q, k, v), kw


PADDED = ["plain", "bool-mask", "float-mask", "key-padding", "causal", "causal-mask"]
PACKED = ["self", "cross", "causal", "mixed-causal", "uniform", "uniform-cross", "uniform-causal"]

# What each CPU backend cannot do here; every such request must be a clear AttentionError.
REFUSED = {
    ("nested", "padded"): "packed input",
    ("nested", "causal"): "causal",
    ("nested", "mixed-causal"): "causal",
    ("nested", "uniform-causal"): "causal",
}


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-math", "sdpa-flash", "matmul", "nested", "flex"])
@pytest.mark.parametrize("case", [("padded", c) for c in PADDED] + [("packed", c) for c in PACKED],
                         ids=lambda c: "-".join(c))
def test_backend_matches_the_float64_reference(backend, case):
    layout, name = case
    if backend == "sdpa-flash" and layout == "packed":
        pytest.skip("sdpa-<kernel> names a padded kernel; packed SDPA pads per sequence through 'sdpa'")
    tensors, kw = padded_case(name) if layout == "padded" else packed_case(name)
    refused = REFUSED.get((backend, layout)) or REFUSED.get((backend, name))
    grad = backend != "flex"  # FlexAttention has no backward on CPU (tested below)
    if refused:
        with pytest.raises(AttentionError, match=refused):
            run(backend, tensors, torch.float32, grad=grad, **kw)
        return
    want, want_grads = run("math", tensors, torch.float64, grad=grad, **kw)
    got, got_grads = run(backend, tensors, torch.float32, grad=grad, **kw)
    assert want.dtype == torch.float64 and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [("padded", c) for c in PADDED] + [("packed", c) for c in PACKED],
                         ids=lambda c: "-".join(c))
def test_matmul_backend_in_bf16_matches_the_float64_reference_and_stays_finite(case):
    """What `auto` runs for short bf16 sequences on CPU: bf16 products, float32 softmax. A packed sequence with no
    tokens (LENGTHS_*[2]) must not turn any gradient into NaN."""
    layout, name = case
    tensors, kw = padded_case(name) if layout == "padded" else packed_case(name)
    want, want_grads = run("math", tensors, torch.float64, **kw)
    got, got_grads = run("matmul", tensors, torch.bfloat16, **kw)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=6e-2, rtol=5e-2)


def test_float64_runs_on_sdpa_and_the_reference_alike():
    tensors, kw = packed_case("cross")
    want, _ = run("math", tensors, torch.float64, **kw)
    got, _ = run("nested", tensors, torch.float64, **kw)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "nested", "math"])
def test_packed_output_equals_each_sequence_alone(backend):
    (q, k, v), kw = packed_case("cross")
    q, k, v = (t.float() for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kw)
    cq, ck = Packing.from_lengths(LENGTHS_Q).cu_seqlens, Packing.from_lengths(LENGTHS_K).cu_seqlens
    for i in range(len(LENGTHS_Q)):
        if LENGTHS_Q[i] == 0:
            continue
        alone = attention(*(t[a:b].transpose(0, 1)[None] for t, a, b in (
            (q, cq[i], cq[i + 1]), (k, ck[i], ck[i + 1]), (v, ck[i], ck[i + 1]))), backend="sdpa-math")
        torch.testing.assert_close(out[cq[i]:cq[i + 1]], alone[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_modality_separated_decoder_mask_matches_a_dense_4m_style_mask():
    """4M's decoder self-attention, written as ml-4m does it (one padded sample, a dense boolean mask: same
    modality, causal inside the caption), against our packing of one sequence per (sample, modality)."""
    modalities = [0] * 4 + [1] * 5 + [2] * 3  # image tokens, caption tokens (causal), a second image modality
    L = len(modalities)
    x = [rand(2, H, L, D, seed=s) for s in (11, 12, 13)]
    mod = torch.tensor(modalities)
    pos = torch.arange(L)
    dense = (mod[:, None] == mod[None, :]) & ((mod[:, None] != 1) | (pos[:, None] >= pos[None, :]))
    want = attention(*x, mask=dense[None, None], backend="math")
    packed = [t.transpose(1, 2).reshape(2 * L, H, D) for t in x]
    causal = torch.tensor([False, True, False] * 2)
    got = attention(*packed, cu_seqlens_q=Packing.from_lengths([4, 5, 3] * 2).cu_seqlens, causal=causal)
    torch.testing.assert_close(got.view(2, L, H, D).transpose(1, 2), want, atol=1e-10, rtol=1e-9)


def test_flex_refuses_backward_on_cpu_and_the_absent_backends_say_what_to_install():
    (q, k, v), kw = packed_case("self")
    q = q.float().requires_grad_()
    with pytest.raises(AttentionError, match="no backward on CPU.*'nested' or 'sdpa'"):
        attention(q, k.float(), v.float(), backend="flex", **kw)
    with pytest.raises(AttentionError, match="CUDA only"):
        attention(q, k.float(), v.float(), backend="flash", **kw)
    with pytest.raises(AttentionError, match="CUDA only"):
        attention(q, k.float(), v.float(), backend="varlen", **kw)
    status = usable_backends("cpu")
    if not status["xformers"].startswith("yes"):
        with pytest.raises(AttentionError, match="xformers"):
            attention(q, k.float(), v.float(), backend="xformers", **kw)
    assert status["sdpa"] == "yes" and status["math"] == "yes"
    assert status["flex"] == "yes (forward only)" and status["flash"].startswith("no")


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 5, 6, 6, 15, 18], dtype=torch.int32)), "ends at 18"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 6, 5, 5, 14, 19], dtype=torch.int32)), "never decrease"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0.0, 19.0])), "int32/int64"),
    (lambda a: a.update(k=a["k"][..., :4]), "head dimensions differ"),
    (lambda a: a.update(v=a["v"].double()), "share a dtype"),
    (lambda a: a.update(k=a["k"][:7], v=a["v"][:7]), "give cu_seqlens_k"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 19], dtype=torch.int32)), "must pair up"),
    (lambda a: a.update(mask=torch.ones(19, 19, dtype=torch.bool)), "takes no mask"),
    (lambda a: a.update(causal=torch.tensor([True, False])), "one bool per sequence"),
    (lambda a: a.update(backend="cutlass"), "unknown attention backend"),
    (lambda a: a.update(max_seqlen_q=4), "longest sequence has 9"),
], ids=["sum", "decreasing", "float-cu", "head-dim", "dtype", "cross-without-cu", "pairs", "packed-mask",
        "causal-shape", "unknown-backend", "max-seqlen"])
def test_bad_packed_input_is_one_clear_error(change, message):
    (q, k, v), kw = packed_case("self")
    args = dict(q=q.float(), k=k.float(), v=v.float(), **kw)
    change(args)
    with pytest.raises(AttentionError, match=message):
        attention(**args)


@pytest.mark.parametrize("mask_shape, message", [((2, 1, 6, 6), "does not broadcast"), ((2, 6), "key-padding"),
                                                  ((6,), "does not broadcast")])
def test_a_mask_of_the_wrong_shape_is_one_clear_error(mask_shape, message):
    (q, k, v), _ = padded_case("plain")
    with pytest.raises(AttentionError, match=message):
        attention(q, k, v, mask=torch.ones(mask_shape, dtype=torch.bool))
    with pytest.raises(AttentionError, match="causal attention needs as many keys"):
        attention(q, k, v, causal=True)


def test_auto_chooses_by_the_documented_rule_and_logs_once(caplog):
    from polymodal.models import attention as module

    module._log_choice.cache_clear()  # earlier tests in this process logged their choices already
    (q, k, v), kw = packed_case("self")
    with caplog.at_level(logging.INFO, logger="polymodal"):
        for _ in range(3):
            attention(q.float(), k.float(), v.float(), **kw)
        attention(q.float(), k.float(), v.float(), causal=True, **kw)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention: backend")]
    assert any("sdpa for packed full float32" in m for m in lines), lines  # on CPU (measured faster than nested)
    assert any("sdpa for packed causal float32" in m for m in lines), lines
    assert len([m for m in lines if "sdpa for packed full float32" in m]) == 1


def test_auto_runs_short_bf16_sequences_on_cpu_as_two_products_and_long_ones_through_sdpa(caplog):
    from polymodal.models import attention as module

    module._log_choice.cache_clear()
    (q, k, v), kw = packed_case("self")
    with caplog.at_level(logging.INFO, logger="polymodal"):
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
        attention(q.float(), k.float(), v.float(), **kw)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention: backend")]
    assert any("matmul for packed full bfloat16" in m for m in lines), lines
    assert any("sdpa for packed full float32" in m for m in lines), lines  # fp32: torch's flash kernel is faster
    assert module.choose_backend(torch.device("cpu"), torch.bfloat16, False, False, False,
                                 module.MATMUL_MAX_KEYS) == "matmul"
    assert module.choose_backend(torch.device("cpu"), torch.bfloat16, False, False, False,
                                 module.MATMUL_MAX_KEYS + 1) == "sdpa"


GPU_BACKENDS = ["sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "nested", "flex", "xformers", "flash",
                "varlen"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "packed", "packed-causal", "cross"])
def test_gpu_backends_in_bf16_match_the_float64_reference(backend, layout):
    """Forward and backward in bf16 on CUDA; a backend that is absent or cannot take the request here must say so
    with an AttentionError (reported as a skip, with its reason), never a wrong answer."""
    status = usable_backends("cuda")[backend]
    if not status.startswith("yes"):
        pytest.skip(f"{backend}: {status}")
    if layout == "padded":
        tensors, kw = padded_case("plain")
    else:
        tensors, kw = packed_case({"packed": "self", "packed-causal": "causal", "cross": "cross"}[layout])
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    tensors = [t.cuda() for t in tensors]
    want, want_grads = run("math", tensors, torch.float64, **kw)
    try:
        got, got_grads = run(backend, tensors, torch.bfloat16, grad="forward only" not in status, **kw)
    except AttentionError as exc:
        pytest.skip(f"{backend} refuses {layout}: {exc}")
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=6e-2, rtol=6e-2)
