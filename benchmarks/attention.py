"""Attention forward + backward on 4M-like packed batches: our packed path against ml-4m's hand-written attention
with a dense padded mask and against SDPA on the same padded input, in one run.

Methods (on CPU each (case, method) runs in a fresh process, so peak memory is its own):
- `ours-auto`: `polymodal.models.attention.attention` on packed tokens, backend "auto" (the choice is recorded);
  `ours-<backend>`: the same forced to each packed backend that trains on this device (sdpa, matmul, nested, flash,
  varlen, xformers, flex on CUDA);
- `sdpa-block-diagonal`: the whole pack as one sequence with a [T, T] block-diagonal mask through SDPA (the
  alternative to nested tensors for packed input on SDPA);
- `ml4m-dense`: ml-4m's attention: every sample padded to the fixed token count (`--max-len`), a dense boolean mask
  [B, 1, L, L] built per batch, `softmax(q @ k^T * scale masked_fill -inf) @ v` by hand;
- `sdpa-padded-mask`: the same padded input and dense mask through torch SDPA.

Cases: `varlen` (batch `--batch` sequences of lengths drawn uniformly from `--min-len`..`--max-len`, about 56%
fill), `long` (one sequence of `--long` tokens), and on CUDA `fixed1024` (sequences of 1,024 tokens: the
share of the chip's datasheet peak).

Figures: tokens/s (real tokens, forward + backward), achieved TFLOP/s of useful work (12 * heads * head_dim *
sum(L^2): forward QK^T and AV, backward twice that; padding not counted), and peak memory above the inputs during
one step (CPU: the C heap's bytes in use, sampled; CUDA: torch's peak allocation).

    python benchmarks/attention.py                       # CPU, fp32
    python benchmarks/attention.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import machine_info, wait_quiet, write_report  # noqa: E402

PEERS = ("ml4m-dense", "sdpa-padded-mask", "sdpa-block-diagonal")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lengths_for(case: str, args) -> list[int]:
    if case == "varlen":
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=gen).tolist()
    if case == "long":
        return [args.long]
    return [1024] * args.batch_1024


def ml4m_attention(q, k, v, mask, scale):
    """ml-4m's Attention.forward after the qkv projection: scores, masked_fill with -inf, softmax, @ v."""
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.masked_fill(~mask, float("-inf"))
    attn = attn.softmax(dim=-1)
    return attn @ v


def prepare(method: str, lengths: list[int], args):
    """The inputs and a step() running forward + backward of `method` on them; the backend `auto` picks."""
    from polymodal.models.attention import Packing, attention, choose_backend

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    H, D, T = args.heads, args.head_dim, sum(lengths)
    gen = torch.Generator().manual_seed(args.seed + 1)
    packed = [torch.randn(T, H, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
    grad_out = torch.randn(T, H, D, generator=gen).to(device, dtype)
    packing = Packing.from_lengths(lengths)
    cu, scale = packing.cu_seqlens.to(device), D ** -0.5
    pad_to = max(args.max_len, max(lengths)) if len(lengths) > 1 else lengths[0]
    ids, pos = packing.sequence_ids().to(device), packing.positions().to(device)
    chosen = None

    if method.startswith("ours-"):
        backend = method.removeprefix("ours-")
        chosen = choose_backend(device, dtype, True, False, False, max(lengths)) if backend == "auto" else backend

        def step():
            attention(*packed, cu_seqlens_q=cu, max_seqlen_q=packing.max_seqlen, backend=backend).backward(grad_out)
    elif method == "sdpa-block-diagonal":
        def step():
            mask = ids[:, None] == ids[None, :]
            q, k, v = (t.transpose(0, 1)[None] for t in packed)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[0].transpose(0, 1).backward(grad_out)
    else:
        def step():  # ml-4m pads every sample to a fixed token count and builds a dense mask per batch
            B = len(lengths)
            padded = [t.new_zeros(B, pad_to, H, D).index_put((ids, pos), t).transpose(1, 2) for t in packed]
            valid = torch.arange(pad_to, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
            mask = (valid[:, :, None] & valid[:, None, :])[:, None]  # [B, 1, L, L]
            mask = mask | torch.eye(pad_to, dtype=torch.bool, device=device)  # padded rows keep one key (no NaN)
            if method == "ml4m-dense":
                out = ml4m_attention(*padded, mask, scale)
            else:
                out = F.scaled_dot_product_attention(*padded, attn_mask=mask, scale=scale)
            out.transpose(1, 2)[ids, pos].backward(grad_out)
    return step, packed, chosen, pad_to


class HeapPeak:
    """Peak bytes in use by this process's C heap while the block runs, above what was in use at its start:
    glibc's mallinfo2 (heap plus mmapped blocks, which is where torch's CPU tensors live) sampled by a thread every
    0.2 ms. A process's peak resident set would miss memory freed earlier and reused (measured: 0 MB for a step
    that allocates tens of MB)."""

    def __init__(self):
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                              "usmblks", "fsmblks", "uordblks", "fordblks",
                                                              "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        self._info, self.peak = libc.mallinfo2, 0

    def in_use(self) -> int:
        info = self._info()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        import threading

        self.base = self.peak = self.in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.in_use())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def measure(method: str, lengths: list[int], args) -> dict:
    """One method on one case, in this (fresh) process: median seconds of forward + backward, peak memory above
    the inputs. A tiny run first does the one-time work (imports, kernel selection) outside the memory figure."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prepare(method, [8, 5] if len(lengths) > 1 else [8], args)[0]()
    step, packed, chosen, pad_to = prepare(method, lengths, args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # a step of its own, with the sampler on (the timed steps run without it)
        with HeapPeak() as heap:
            step()
        peak = heap.bytes
    times = []
    for i in range(args.warmup + args.repeats):
        for t in packed:
            t.grad = None
        t0 = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    seconds, T = statistics.median(times), sum(lengths)
    flops = 12.0 * args.heads * args.head_dim * sum(n * n for n in lengths)
    return {"method": method, "backend": chosen, "seconds": seconds, "tokens_per_s": T / seconds,
            "tflops": flops / seconds / 1e12, "peak_memory_mb": max(peak, 0) / 2**20, "tokens": T,
            "padded_tokens": len(lengths) * pad_to if method in PEERS[:2] else T}


def methods_for(args) -> list[str]:
    from polymodal.models.attention import usable_backends

    usable = usable_backends(args.device)
    trains = lambda b: usable[b].startswith("yes") and "forward only" not in usable[b]  # noqa: E731
    ours = ["ours-auto"] + [f"ours-{b}" for b in ("sdpa", "matmul", "nested", "flash", "varlen", "xformers", "flex")
                            if trains(b)]
    return ours + list(PEERS)


def run_isolated(method: str, lengths: list[int], args) -> dict:
    """In a fresh process on CPU (its heap figure is its own); in this one on CUDA, where torch's peak-allocation
    counter is exact and a CUDA start per method would cost seconds each."""
    if args.device.startswith("cuda"):
        try:
            return measure(method, lengths, args)
        except Exception as exc:  # noqa: BLE001 - out of memory or a kernel error is a result too
            return {"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        finally:
            torch.cuda.empty_cache()
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(measure, method, lengths, args).result(timeout=args.timeout)
        except Exception as exc:  # noqa: BLE001 - a method that fails (out of memory, a kernel error) is reported
            return {"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=16, help="sequences in the varlen case")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512, help="also ml-4m's fixed padded token count")
    parser.add_argument("--long", type=int, default=4096, help="tokens of the long case's one sequence")
    parser.add_argument("--batch-1024", type=int, default=16, help="sequences of 1,024 tokens (CUDA case)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cases", nargs="+", default=None, help="varlen long fixed1024 (default: varlen long, and "
                                                                 "fixed1024 on CUDA)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every ours-* that trains here + peers")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per (case, method)")
    parser.add_argument("--max-wait", type=float, default=60, help="seconds to wait for a quiet machine first")
    parser.add_argument("--out", default="bench-out/attention.json")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    cases = args.cases or (["varlen", "long"] + (["fixed1024"] if args.device.startswith("cuda") else []))
    methods = args.methods or methods_for(args)
    waited = wait_quiet(0.25, args.max_wait)
    results = {}
    for case in cases:
        lengths = lengths_for(case, args)
        rows = []
        for method in methods:
            row = run_isolated(method, lengths, args)
            rows.append(row)
            print(f"{case:9} {method:20} " + (row["error"] if "error" in row else
                  f"{row['tokens_per_s']:10.0f} tokens/s {row['tflops']:8.4f} TFLOP/s "
                  f"{row['peak_memory_mb']:9.1f} MB" + (f"  ({row['backend']})" if row.get("backend") else "")),
                  flush=True)
        ok = {r["method"]: r for r in rows if "error" not in r}
        summary = {"lengths": lengths, "fill": sum(lengths) / (len(lengths) * max(args.max_len, max(lengths))),
                   "rows": rows}
        if "ours-auto" in ok:
            for peer in PEERS:
                if peer in ok:
                    summary[f"speedup_vs_{peer}"] = ok["ours-auto"]["tokens_per_s"] / ok[peer]["tokens_per_s"]
                    summary[f"memory_ratio_{peer}_over_ours"] = (ok[peer]["peak_memory_mb"]
                                                                 / max(ok["ours-auto"]["peak_memory_mb"], 1e-3))
        if case == "fixed1024" and args.device.startswith("cuda"):
            from polymodal.pretrain.flops import device_peak_flops

            peak = device_peak_flops(torch.device(args.device), args.dtype)
            best = max((r for r in ok.values() if r["method"].startswith("ours-")), key=lambda r: r["tflops"],
                       default=None)
            if peak and best:
                summary["best"] = best["method"]
                summary["share_of_datasheet_peak"] = best["tflops"] * 1e12 / peak
        results[case] = summary
        print({k: round(v, 3) for k, v in summary.items() if isinstance(v, float)}, flush=True)
    report = {"benchmark": "attention", "device": args.device, "dtype": args.dtype, "heads": args.heads,
              "head_dim": args.head_dim, "waited_for_quiet_s": waited, "cases": results,
              "machine": machine_info("torch", optional=("xformers", "flash_attn"), device=args.device)}
    print(f"wrote {write_report(args.out, report)}")


if __name__ == "__main__":
    main()
