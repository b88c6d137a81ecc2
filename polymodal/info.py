"""`polymodal info`: versions, devices and the attention backends that actually run here (probed, not assumed)."""

from __future__ import annotations

import argparse
import json
import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("polymodal", "torch", "deepspeed", "open_clip_torch", "timm", "transformers", "webdataset", "xformers",
            "flash-attn", "flash-attn-4")


def cpu_bf16_speedup(size: int = 384, repeats: int = 8) -> float:
    """How many times faster a bf16 matrix product runs than an fp32 one on this CPU (best of `repeats`, torch's
    threads). CPUs with AVX512-BF16 or AMX run bf16 products 2-4x faster, others emulate them slower, so this says
    whether `precision: bf16` pays on the CPU (measured: MultiMAE trained 2x faster in bf16 on an AVX512-BF16 CPU)."""
    import time

    import torch

    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # the first call sets the kernel up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def collect() -> dict:
    import torch

    from polymodal.models.attention import usable_backends

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {
        "python": platform.python_version(),
        "packages": {name: installed(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "devices": {d: (torch.cuda.get_device_name(d) if d != "cpu" else platform.processor() or platform.machine())
                    for d in devices},
        "attention": {d: usable_backends(d) for d in devices},
        "cpu_bf16_matmul_speedup": round(cpu_bf16_speedup(), 2),
    }


def show(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"python {info['python']}, torch built for CUDA {info['torch_cuda'] or '-'}")
    for name, ver in info["packages"].items():
        print(f"  {name:16} {ver or 'not installed'}")
    speedup = info["cpu_bf16_matmul_speedup"]
    print(f"cpu bf16 matrix products: {speedup:.1f}x fp32's speed ("
          + ("precision=bf16 trains faster on this CPU)" if speedup > 1.2 else "keep precision=fp32 on this CPU)"))
    for device, name in info["devices"].items():
        print(f"{device} ({name}): attention backends")
        for backend, status in info["attention"][device].items():
            print(f"  {backend:15} {status}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "info", help="versions, devices and usable attention backends",
        description="Print package versions, the devices torch sees, and for each device which attention backends "
                    "run (each is probed with a tiny real call checked against the float64 reference; 'forward "
                    "only' backends cannot train there), and how much faster bf16 matrix products run than fp32 "
                    "ones on this CPU (whether precision=bf16 pays off without a GPU).")
    parser.add_argument("--json", action="store_true", help="print it as JSON")
    parser.set_defaults(func=show)
