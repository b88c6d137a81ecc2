"""4M training speed: our `4m` objective against a re-implementation of ml-4m's mechanism
(benchmarks/fourm_reference.py), on the same model, weights, batches and real data, in one run.

  ours  raw token batches (image tokens and WordPiece captions) go to the objective, which masks them on the device
        inside the step (vectorised: the mixture of Dirichlets, exact budgets, span masking) and runs encoder and
        decoder in its layout: no sample padded to a fixed count; with `packed` unset, packed on CUDA (varlen
        kernels) and on CPU each sample padded to the batch's longest with dense masks (on CPU packed sequences
        are padded anyway, one per (sample, modality), which is slower); attention through our attention
        function.
  peer  masking per sample in Python inside DataLoader workers (--workers; ml-4m's UnifiedMasking), every sample at
        fixed shapes, the encoder and decoder padded to --input-tokens / --target-tokens, every attention written by
        hand with dense boolean masks (4M's decoder mask).

Timed: samples/s of whole training steps (zero_grad, forward with its masking, backward, AdamW step, loss read
back), the peer's including the wait for its workers, as in a real run. On this 2-core machine the peer's workers
share the cores with training, as they would on a laptop; `peer (masked beforehand)` gives the peer's model alone,
its batches masked before the clock starts (the best a machine with spare cores for workers could do). Data: the
config's token sets (configs/4m-tiny-cifar.yaml: CIFAR-10, emoji and ImageNet samples as rgb and edges tokens,
captions, palettes and metadata, built by `recipes/4m.sh cifar data-out/4m-cifar`), read once into memory. Rounds
interleave the sides; figures are medians; ratio = ours / peer. Before timing, both sides take the same batch with
the same masks (drawn by ours): their losses must agree (the same math, two mechanisms). Peak memory of one step
per side is reported too.

    python benchmarks/fourm_step.py                       # tiny 4M (configs/4m-tiny-cifar.yaml), batch 64
    python benchmarks/fourm_step.py --steps 3 --warmup 1 --rounds 1 --batch-size 8 --max-wait 0    # smoke run
    python benchmarks/fourm_step.py --device cuda --precision bf16 --dim 768 --encoder-depth 12 \
        --decoder-depth 12 --heads 12 --batch-size 256 --max-wait 0          # 4M-B's widths, on a GPU, with MFU

On a GPU (--device cuda) both sides train under bf16 autocast when --precision bf16, each step ends with a device
synchronize, and MFU is reported: training FLOPs per sample (3x the forward, counted by torch on our side) times
samples/s over the device's datasheet peak. The data stay the config's token sets (4M-B's widths on the tiny
token budgets: a speed figure, not 4M-B's own sequence lengths).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_common import add_quiet_options, finish, machine_info, timed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fourm_reference import ReferenceMasking, as_tokens, collate, reference_loss  # noqa: E402


def build(args):
    from polymodal.pretrain.config import load_pretrain_config
    from polymodal.pretrain.objectives import build_objective

    overrides = [f"data.batch_size={args.batch_size}"]
    overrides += [f"objective.{key}={getattr(args, key)}" for key in ("dim", "encoder_depth", "decoder_depth", "heads")
                  if getattr(args, key) is not None]
    overrides += [f"data.shards={args.shards}"] if args.shards else []
    overrides += [f"data.join=[{','.join(args.join)}]"] if args.join else []
    cfg = load_pretrain_config(args.config, overrides)
    torch.manual_seed(args.seed)
    return cfg, build_objective(cfg.objective).to(args.device).train()


def autocast(args, precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(args) -> None:
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize(args.device)


def raw_batches(cfg, count: int) -> list[dict]:
    from polymodal.data.pipeline import ShardLoader
    from polymodal.distributed import Placement

    cfg.data.num_workers, cfg.data.shuffle_buffer = 0, 0
    batches = []
    for batch in ShardLoader(cfg.data, where=Placement(0, 1)):
        batches.append(batch)
        if len(batches) == count:
            return batches
    sys.exit(f"only {len(batches)} batches in {cfg.data.shards}")


def samples_of(objective, batches: list[dict]) -> list[dict]:
    """Each batch's samples as the reference's dataset holds them (a sequence cut to its length)."""
    out = []
    for batch in batches:
        for i in range(len(batch["__key__"])):
            sample = {}
            for name, spec in objective.specs.items():
                ids = batch[name][i]
                lengths = batch.get(f"{name}_lengths")  # absent when every sequence of the batch is as long
                if not spec.is_sequence:
                    ids = ids.flatten()
                elif lengths is not None:
                    ids = ids[: lengths[i]]
                sample[name] = ids
            out.append(sample)
    return out


def optimizer_for(model):
    from polymodal.pretrain.optim import param_groups

    return torch.optim.AdamW(param_groups(model, 0.05, 2e-3), lr=2e-3, betas=(0.9, 0.95))


def loss_check(objective, batch) -> dict:
    """Both mechanisms on the same batch with the same masks: the losses must agree."""
    torch.manual_seed(1)
    inputs, targets, labels = objective.draw_masks(objective.read_batch(batch))
    with torch.no_grad():
        logits = objective.model(inputs, targets)
        ours = []
        for name, lg in logits.items():
            ours.append(torch.nn.functional.cross_entropy(lg.float(), labels[name][targets[name].keep]))
        ours = torch.stack(ours).mean().item()
        peer = reference_loss(objective, inputs, targets, labels).item()
    return {"ours": ours, "peer": peer, "rel_diff": abs(ours - peer) / abs(ours), "match": abs(ours - peer) < 1e-4 *
            abs(ours)}


def step(objective, optimizer, loss_fn, args, precision: str):
    optimizer.zero_grad(set_to_none=True)
    with autocast(args, precision):
        loss = loss_fn()
    loss.backward()
    optimizer.step()
    return loss.item()  # waits for the device


def run_ours(args, objective, optimizer, batches) -> float:
    for batch in batches[: args.warmup]:
        step(objective, optimizer, lambda: objective(batch)["loss"], args, args.precision)
    sync(args)
    t0 = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(objective, optimizer, lambda: objective(batch)["loss"], args, args.precision)
    return args.batch_size * (len(batches) - args.warmup) / (time.perf_counter() - t0)


def run_peer(args, objective, optimizer, dataset, premasked: list | None = None) -> float:
    loader = premasked or torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                                      num_workers=args.workers, collate_fn=collate,
                                                      persistent_workers=False, prefetch_factor=2 if args.workers
                                                      else None)
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == args.warmup:
            sync(args)
            t0 = time.perf_counter()
        step(objective, optimizer, lambda: reference_loss(objective, *as_tokens(objective, batch, args.device)), args,
             args.peer_precision)
        n += i >= args.warmup
        if i + 1 == args.warmup + args.steps:
            break
    return args.batch_size * n / (time.perf_counter() - t0)


def peak_memory(args, fn) -> float | None:
    """Peak memory of one step in MB: the CUDA allocator's peak on a GPU, the process heap's on the CPU."""
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
        fn()
        return torch.cuda.max_memory_allocated(args.device) / 2 ** 20
    try:
        from attention import HeapPeak

        with HeapPeak() as heap:
            fn()
        return heap.bytes / 2 ** 20
    except (OSError, AttributeError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "4m-tiny-cifar.yaml"))
    parser.add_argument("--shards", help="source shards (default: the config's data.shards)")
    parser.add_argument("--join", nargs="+", help="token sets (default: the config's data.join)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="the peer's masking workers (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: both sides under bf16 autocast (the loss check stays fp32)")
    parser.add_argument("--peer-precision", choices=["fp32", "bf16"], default=None,
                        help="the peer's precision when it differs from ours (default: --precision); fp32 is all "
                             "ml-4m has on a CPU (its training loop autocasts with torch.cuda.amp)")
    for key in ("dim", "encoder-depth", "decoder-depth", "heads"):
        parser.add_argument(f"--{key}", type=int, help="override the config's objective." + key.replace("-", "_"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench-out" / "fourm_step.json"))
    add_quiet_options(parser)
    args = parser.parse_args(argv)
    args.peer_precision = args.peer_precision or args.precision
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg, ours = build(args)
    peer = build(args)[1]
    peer.load_state_dict(ours.state_dict())
    batches = raw_batches(cfg, args.warmup + args.steps)
    dataset = ReferenceMasking(samples_of(ours, batches), peer)
    premasked = [collate([dataset[i] for i in range(j, j + args.batch_size)])
                 for j in range(0, len(dataset), args.batch_size)]
    from polymodal.pretrain.engine import to_device

    device = torch.device(args.device)
    batches = [to_device(batch, device) for batch in batches]
    premasked = [{name: tuple(part.to(device) for part in parts) for name, parts in b.items()} for b in premasked]
    check = loss_check(ours, batches[0])
    print(f"[check] first loss ours {check['ours']:.6f} peer {check['peer']:.6f} (match: {check['match']})")
    optimizers = {"ours": optimizer_for(ours), "peer": optimizer_for(peer), "peer_premasked": optimizer_for(peer)}
    runs = {"ours": [], "peer": [], "peer_premasked": []}
    sides = {"ours": lambda: run_ours(args, ours, optimizers["ours"], batches),
             "peer": lambda: run_peer(args, peer, optimizers["peer"], dataset),
             "peer_premasked": lambda: run_peer(args, peer, optimizers["peer_premasked"], dataset, premasked)}
    for r in range(args.rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            rate, record = timed(sides[side], args.max_other_load, args.max_wait)
            record["samples_per_s"] = rate
            runs[side].append(record)
            print(f"[round {r}] {side}: {rate:.1f} samples/s (other load {record['other_load']})", flush=True)
    medians = {side: statistics.median(r["samples_per_s"] for r in records) for side, records in runs.items()}
    memory = {"ours": peak_memory(args, lambda: step(ours, optimizers["ours"], lambda: ours(batches[0])["loss"],
                                                     args, args.precision)),
              "peer": peak_memory(args, lambda: step(peer, optimizers["peer"],
                                                     lambda: reference_loss(peer, *as_tokens(peer, premasked[0])),
                                                     args, args.peer_precision))}
    from polymodal.pretrain.flops import device_peak_flops, training_flops_per_sample

    flops = training_flops_per_sample(ours, batches[0], samples=args.batch_size)
    peak_flops = device_peak_flops(device, args.precision)
    mfu = {side: flops * rate / peak_flops for side, rate in medians.items()} if peak_flops else None
    report = {"benchmark": "benchmarks/fourm_step.py", "settings": vars(args),
              "parameters": sum(p.numel() for p in ours.parameters()), "machine": machine_info("torch"),
              "check": check, "samples_per_s": medians, "ratio": medians["ours"] / medians["peer"],
              "ratio_vs_premasked_peer": medians["ours"] / medians["peer_premasked"], "peak_memory_mb": memory,
              "flops_per_sample": flops, "peak_flops": peak_flops, "mfu": mfu, "runs": runs}
    print(f"\nsamples/s: ours {medians['ours']:.1f}, peer {medians['peer']:.1f} (masked beforehand "
          f"{medians['peer_premasked']:.1f}); ours/peer {report['ratio']:.2f}x, ours/premasked "
          f"{report['ratio_vs_premasked_peer']:.2f}x; peak MB {memory}; training FLOPs per sample "
          f"{flops / 1e6:.1f} M" + (f"; MFU ours {100 * mfu['ours']:.2f}%, peer {100 * mfu['peer']:.2f}% of "
                                    f"{peak_flops / 1e12:.0f} TFLOP/s" if mfu else ""))
    return finish(args.out, report, t_start)


if __name__ == "__main__":
    raise SystemExit(main())
