"""Training-step benchmark on one GPU: tokens/s, step time, model TFLOP/s and MFU, peak memory, and
where the GPU time goes (PyTorch profiler), at the configured MTP depth and at D=0.

    python tools/bench_train.py --config configs/small.yaml [--set k=v ...] [--steps 20] [--warmup 5]
        [--precision bf16|fp8] [--compile] [--cuda-graph] [--disable grouped_mm] [--enable quack_experts] [--label NAME] [--results FILE]
    python tools/bench_train.py --table FILE [--peer TT_JSON] [--only PREFIX]  # print the table of FILE's rows
        (--peer: torchtitan's bench_tt.py --json-out rows of the same run, side by side)

The MTP design comes from the config: e.g. --set model.mtp_kind=parallel --set model.mtp_depth=3
[--set train.mtp_heads_one_at_a_time=true]; the table's MTP column reads seq/par and the depth, with
"1x" for one head at a time.

The step is what `dsmtp train` does: forward under bf16 autocast (fp32 parameters, bf16 GEMMs),
backward, the trainer's optimizer (fused AdamW on the fp32 parameters with gradient clipping folded in:
dsmtp.train.optim.clipped_step), router-bias update. Inputs are random tokens
(uniform, so routing is close to balanced: real text routes less evenly).

MFU is dsmtp.train.flops.mfu: docs/design.md's FLOPs per token over the dense bf16 peak of one H100 / H200.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._dynamo

sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH may name another dsmtp first

from dsmtp.config import ConfigError, load_config, validate  # noqa: E402
from dsmtp.model import DeepSeekV3, kernels, moe_layers, update_expert_bias  # noqa: E402
from dsmtp.parallel.topology import ensure_initialized  # noqa: E402
from dsmtp.train.cuda_graph import EAGER_STEPS, GraphedBackward  # noqa: E402
from dsmtp.train.metrics import MetricsLog  # noqa: E402
from dsmtp.train.flops import PEAK_BF16_FLOPS, flops_per_token, mfu  # noqa: E402
from dsmtp.train.optim import build_optimizer, clipped_step  # noqa: E402
from dsmtp.train.overlap import OverlappedUpdate  # noqa: E402
from dsmtp.train.trainer import autocast_for, apply_train_settings  # noqa: E402

PEAK_BF16_TFLOPS = PEAK_BF16_FLOPS / 1e12
CATEGORIES = ("attention", "experts+FFN", "router+dispatch", "rest")
# GPU time by the op that launched each kernel: unambiguous in compiled runs too, where fused kernels
# cross the module boundaries CATEGORIES are labelled by. "other": fused elementwise and reduction
# kernels (norms, RoPE, SwiGLU, casts, dispatch permutation, cross-entropy), sorts, copies.
FAMILIES = ("attention", "grouped GEMM", "GEMM", "optimizer", "other", "no op")
PHASES = ("forward+backward", "clip+update", "zero_grad+bias")


def _labelled(fn, label: str):
    def run(*args, **kwargs):
        with torch.profiler.record_function("cat::" + label):
            return fn(*args, **kwargs)
    return run


def label_modules(model: torch.nn.Module) -> None:
    """Name the profiler ranges the time shares are read from (innermost label wins)."""
    from dsmtp.model.attention import MLA
    from dsmtp.model.mlp import MLP
    from dsmtp.model.moe import RoutedExperts, Router

    for module in model.modules():
        label = {MLA: "attention", MLP: "experts+FFN", RoutedExperts: "experts+FFN",
                 Router: "router+dispatch"}.get(type(module))
        if label:
            module.forward = _labelled(module.forward, label)
    for moe in moe_layers(model):
        moe.dispatch = _labelled(moe.dispatch, "router+dispatch")


def launching_ops(events):
    """(CPU-side op, GPU microseconds of the kernels it launched itself). Each kernel counts once, on
    that op: the profiler also lists the kernel itself, and each labelled range again on the GPU side,
    as device events. The CUDA runtime's "Command Buffer Full" (the host waited for room in the launch
    queue) carries device time of kernels that other ops launched: not counted either."""
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU or evt.name.startswith("cat::") \
                or evt.name == "Command Buffer Full":
            continue
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = evt.self_cuda_time_total
        if t > 0:
            yield evt, t


def all_kernels_us(events) -> float:
    """Every kernel's (and memset's, memcpy's) GPU microseconds, as the profiler's own table totals them."""
    return sum(evt.self_device_time_total for evt in events
               if evt.device_type != torch.autograd.DeviceType.CPU and not evt.is_user_annotation)


def kernel_families(prof, steps: int) -> dict[str, float]:
    """GPU milliseconds per step in each of FAMILIES. "no op": kernels that no profiled op launched, such as
    a Triton kernel called from Python (the bf16-moment update): all kernels' time less the attributed."""
    def family(name: str) -> str:
        if "attention" in name:
            return "attention"
        if name.startswith("aten::") and "grouped_mm" in name:
            return "grouped GEMM"
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm"):
            return "GEMM"
        if "adam" in name or "_foreach_" in name:
            return "optimizer"
        return "other"

    events = prof.events()
    totals = dict.fromkeys(FAMILIES, 0.0)
    for evt, t in launching_ops(events):
        totals[family(evt.name)] += t / 1e3 / steps
    totals["no op"] = max(0.0, all_kernels_us(events) / 1e3 / steps - sum(totals.values()))
    return totals


def time_shares(prof) -> dict[str, float]:
    """GPU kernel time per category, as fractions of the time of kernels an op launched.

    Forward kernels take the label of their enclosing range; backward kernels that of the forward op
    whose autograd node launched them (matched by sequence number)."""
    events = prof.events()

    def label_of(evt):
        while evt is not None:
            if evt.name.startswith("cat::"):
                return evt.name[5:]
            evt = evt.cpu_parent
        return None

    seq_label = {}
    for evt in events:
        if getattr(evt, "sequence_nr", -1) >= 0 and not evt.is_async:
            label = label_of(evt)
            if label is not None and "Backward" not in evt.name:
                seq_label.setdefault(evt.sequence_nr, label)
    totals = defaultdict(float)
    for evt, t in launching_ops(events):
        label, a = label_of(evt), evt
        while label is None and a is not None:
            if getattr(a, "sequence_nr", -1) >= 0 and a.sequence_nr in seq_label and "Backward" in a.name:
                label = seq_label[a.sequence_nr]
            a = a.cpu_parent
        totals[label or "rest"] += t
    total = sum(totals.values())
    return {c: totals[c] / total for c in CATEGORIES}


def run_one(cfg, args, mtp_depth: int) -> dict:
    gc.collect()  # the previous run's model, optimizer and graph are gone: its memory must not count here
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg.model.mtp_depth = mtp_depth
    torch.manual_seed(cfg.train.seed)
    model = DeepSeekV3(cfg.model).cuda()
    # The trainer's own speed set-up and autocast (--set train.activation_recompute_every=N applies too).
    apply_train_settings(model, cfg.train)
    autocast = autocast_for(args.precision, torch.device("cuda"))
    model.train()
    opt = build_optimizer(model, cfg.train)
    overlap = OverlappedUpdate(model, opt) if cfg.train.overlap_update else None
    b, s, d = cfg.train.micro_batch_size, cfg.train.seq_len, mtp_depth
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (b, s + d + 1), device="cuda", generator=gen) for _ in range(4)]

    def backward(samples: torch.Tensor, mtp_weight) -> torch.Tensor:
        (sample,) = samples  # one micro-batch a step
        with autocast():
            out = model(sample[:, :s], sample[:, 1:], mtp_weight=mtp_weight)
        out.loss.backward()
        return out.loss.detach()

    graphed = GraphedBackward(backward, list(model.parameters())) if args.cuda_graph else None

    def step(i: int, marks: tuple[torch.cuda.Event, ...] = ()) -> torch.Tensor:
        """marks: two events recorded between the phases, on the GPU's timeline (no host wait)."""
        samples = batches[i % len(batches)][None]
        with contextlib.nullcontext() if overlap is None else overlap.computing():
            loss = (graphed or backward)(samples, 0.3)
            if marks:
                marks[0].record()
            clipped_step(opt, model.parameters(), cfg.train.grad_clip, step=None if overlap is None else overlap.step)
            if marks:
                marks[1].record()
            opt.zero_grad(set_to_none=True)
            update_expert_bias(model, 1e-3)
        return loss

    t0 = time.time()
    for i in range(args.warmup):
        loss = step(i)
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    if not args.cuda_graph:  # a graph allocates its memory once, at capture (in the warm-up): count from there
        torch.cuda.reset_peak_memory_stats()
    # per step: start, after forward+backward, after clipping+update, end
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(args.steps)]
    for i in range(args.steps):
        events[i][0].record()
        loss = step(i, marks=events[i][1:3])
        events[i][3].record()
    torch.cuda.synchronize()
    # The host's own time to issue a step, each from an idle GPU: back to back, a host that is ahead fills
    # the launch queue and then waits on the GPU, so its time per step would read as the GPU's.
    host_issue_ms = []
    for i in range(5):
        t = time.perf_counter()
        step(i)
        host_issue_ms.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    times = [e[0].elapsed_time(e[3]) for e in events]
    step_ms = statistics.median(times)
    # GPU-timeline span of each phase, idle time included: a phase much longer than its kernels waited on the host
    phase_ms = {phase: statistics.median(e[k].elapsed_time(e[k + 1]) for e in events)
                for k, phase in enumerate(PHASES)}
    tokens = b * s
    fpt = flops_per_token(cfg.model, s)
    row = dict(label=args.label or "", precision=args.precision, compile=args.compile, cuda_graph=args.cuda_graph,
               mtp_depth=d, mtp_kind=cfg.model.mtp_kind, heads_one_at_a_time=cfg.train.mtp_heads_one_at_a_time,
               disabled=",".join(args.disable), enabled=",".join(args.enable), device=torch.cuda.get_device_name(),
               attention_backend=next(m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")),
               optimizer_state_dtype=cfg.train.optimizer_state_dtype, param_dtype=cfg.train.param_dtype,
               compile_mode=cfg.train.compile_mode, overlap_update=cfg.train.overlap_update,
               step_ms=step_ms, step_ms_min=min(times), step_ms_max=max(times), tokens_per_s=tokens / step_ms * 1e3,
               gflop_per_token=fpt / 1e9, tflops=fpt * tokens / step_ms / 1e9,
               mfu=mfu(tokens / step_ms * 1e3, cfg.model, s),
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss), warmup_s=warm_s,
               phase_ms=phase_ms, host_issue_ms=statistics.median(host_issue_ms))
    if args.profile_steps and not args.cuda_graph:  # a graph's kernels have no launching op to count them by
        if not args.compile:  # compiled kernels fuse across the labelled ranges: shares would mislead
            label_modules(model)
        torch.cuda.synchronize()
        t1 = time.time()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(args.profile_steps):
                step(i)
            torch.cuda.synchronize()
        wall_ms = (time.time() - t1) * 1e3 / args.profile_steps
        shares = time_shares(prof)
        row["profiled_wall_ms"] = wall_ms
        if not args.compile:
            row.update({f"share_{c}": v for c, v in shares.items()})
        row["kernel_ms"] = kernel_families(prof, args.profile_steps)
        top = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=90, max_name_column_width=200)
        with open(Path(args.results).with_suffix(".prof.txt"), "a") as f:
            f.write(f"==== {args.label} D={d} precision={args.precision} compile={args.compile}\n{top}\n")
    return row


def mtp_column(row: dict) -> str:
    """'seq1', 'par3', 'par3 1x' (one head at a time), '0' for plain next-token training."""
    if not row["mtp_depth"]:
        return "0"
    kind = row.get("mtp_kind", "sequential")[:3]
    return f"{kind}{row['mtp_depth']}" + (" 1x" if row.get("heads_one_at_a_time") else "")


def label_width(rows: list[dict]) -> int:
    """The run column fits the longest label: rows that differ only at the end must stay apart."""
    return max([22] + [len(r["label"]) + 1 for r in rows])


def loss_of(row: dict) -> float:
    """The row's last loss; a non-finite one is written as null (dsmtp.train.metrics)."""
    return math.nan if row["loss"] is None else row["loss"]


def print_table(rows: list[dict]) -> None:
    w = label_width(rows)
    key_head = f"{'run':<{w}}{'prec':<5}{'MTP':>7}"  # the columns every table below starts with

    def key(r: dict) -> str:
        return f"{r['label']:<{w}}{r['precision']:<5}{mtp_column(r):>7}"

    devices = sorted({r["device"] for r in rows})
    params = " or ".join(sorted({r.get("param_dtype", "fp32") for r in rows}))  # rows before session 15: fp32
    print(f"device: {', '.join(devices)}; peak {PEAK_BF16_TFLOPS:.0f} TFLOP/s dense bf16; "
          f"step = fwd+bwd+clip+fused AdamW, bf16 autocast over {params} params (train.param_dtype)")
    head = (f"{key_head}{'tok/s':>9}{'step ms':>9}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>8}"
            f"{'attn':>6}{'exp':>6}{'rout':>6}{'rest':>6}{'loss':>8}")
    print(head)
    for r in rows:
        shares = "".join(f"{r[f'share_{c}'] * 100:>5.0f}%" if f"share_{c}" in r else f"{'-':>6}" for c in CATEGORIES)
        print(f"{key(r)}{r['tokens_per_s']:>9.0f}{r['step_ms']:>9.1f}"
              f"{r['tflops']:>9.1f}{r['mfu'] * 100:>6.1f}%{r['peak_mem_gib']:>8.1f}{shares}{loss_of(r):>8.3f}")
    diverged = [f"{r['label']} D={r['mtp_depth']}" for r in rows if not math.isfinite(loss_of(r))]
    if diverged:
        print(f"not finite loss (its speed is not a result): {', '.join(diverged)}")
    profiled = [r for r in rows if "kernel_ms" in r]
    if profiled:
        print("GPU time per step by the op that launched it (ms; profiler):")
        print(key_head + "".join(f"{f:>14}" for f in FAMILIES) + f"{'sum':>8}")
        for r in profiled:
            ms = r["kernel_ms"]
            print(key(r) + "".join(f"{ms[f]:>14.1f}" if f in ms else f"{'-':>14}" for f in FAMILIES)
                  + f"{sum(ms.values()):>8.1f}")
    phased = [r for r in rows if "phase_ms" in r]
    if phased:
        print("GPU-timeline span of each phase (ms, median step; idle included) and the host's time to issue "
              "a step from an idle GPU:")
        print(key_head + "".join(f"{p:>18}" for p in PHASES) + f"{'host ms':>9}")
        for r in phased:
            host = f"{r['host_issue_ms']:>9.1f}" if "host_issue_ms" in r else f"{'-':>9}"  # rows before it
            print(key(r) + "".join(f"{r['phase_ms'][p]:>18.1f}" for p in PHASES) + host)
    # Each MTP row against a D=0 row: its own label's, else the nearest in the file (rows of one call
    # compare; machines differ by a few percent).
    plain = [i for i, r in enumerate(rows) if not r["mtp_depth"]]
    costs = []
    for i, r in enumerate(rows):
        if r["mtp_depth"] and plain:
            same = [j for j in plain if rows[j]["label"] == r["label"]]
            base = rows[(same or sorted(plain, key=lambda j: abs(j - i)))[0]]
            costs.append(f"{r['label']:<{w}}{mtp_column(r):>7}{(r['step_ms'] / base['step_ms'] - 1) * 100:>+10.1f}%"
                         f"{r['peak_mem_gib'] - base['peak_mem_gib']:>+13.1f}")
    if costs:
        print(f"MTP cost over D=0:\n{'run':<{w}}{'MTP':>7}{'step time':>11}{'memory GiB':>13}")
        print("\n".join(costs))


# torchtitan's variant each dsmtp row is compared with, by MTP depth (../shared/anchors/torchtitan)
PEER_VARIANTS = {0: "compile", 1: "compile+mtp1"}


def print_peer_table(rows: list[dict], peer_rows: list[dict]) -> None:
    """Compiled dsmtp rows against torchtitan's row of the same MTP depth, from the files one run wrote."""
    peer = {r["variant"]: r for r in peer_rows if "error" not in r}
    w = label_width(rows)
    print(f"against torchtitan (bench_tt.py):\n{'run':<{w}}{'MTP':>7}{'tok/s':>9}{'peer':>14}{'peer tok/s':>11}"
          f"{'ratio':>8}{'mem GiB':>8}{'peer GiB':>9}")
    for r in rows:
        variant = PEER_VARIANTS.get(r["mtp_depth"])
        if (not r["compile"] or variant not in peer or r.get("mtp_kind", "sequential") != "sequential"
                or not math.isfinite(loss_of(r))):
            continue
        p = peer[variant]
        print(f"{r['label']:<{w}}{mtp_column(r):>7}{r['tokens_per_s']:>9.0f}{variant:>14}{p['tokens_per_s']:>11.0f}"
              f"{r['tokens_per_s'] / p['tokens_per_s']:>7.4f}x{r['peak_mem_gib']:>8.1f}{p['peak_mem_gib']:>9.1f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true", help="replay forward + backward as one CUDA graph "
                        "(train.cuda_graph; captured during the warm-up)")
    parser.add_argument("--disable", action="append", default=[], help="a kernels.backends fast path to switch off")
    parser.add_argument("--enable", action="append", default=[], help="a kernels.backends path to switch on")
    parser.add_argument("--no-d0", action="store_true", help="skip the MTP D=0 comparison run")
    parser.add_argument("--label")
    parser.add_argument("--results", default="bench_results.jsonl")
    parser.add_argument("--table", help="print the table of a results file and exit")
    parser.add_argument("--peer", help="with --table: torchtitan's bench_tt.py --json-out file of the same run")
    parser.add_argument("--only", default="", metavar="PREFIX", help="with --table: the rows whose label starts so")
    args = parser.parse_args(argv)
    if args.table:
        rows = [r for r in MetricsLog(args.table).records() if r["label"].startswith(args.only)]
        if not rows:
            parser.error(f"--only={args.only!r}: no row of {args.table} has a label starting so")
        print_table(rows)
        if args.peer:
            print_peer_table(rows, json.loads(Path(args.peer).read_text()))
        return 0
    if not args.config:
        parser.error("--config is required")
    if args.cuda_graph and args.warmup <= EAGER_STEPS:
        parser.error(f"--warmup={args.warmup}: --cuda-graph captures after {EAGER_STEPS} eager steps, so warm up "
                     f"for at least {EAGER_STEPS + 1}")
    if args.steps < 20:
        parser.error(f"--steps={args.steps}: time at least 20 steps for a stable median")
    if not torch.cuda.is_available():
        print("bench_train needs a CUDA device", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)
    cfg.train.precision, cfg.train.compile, cfg.train.cuda_graph = args.precision, args.compile, args.cuda_graph
    try:
        validate(cfg)  # the flags above join the config's own rules
    except ConfigError as e:
        parser.error(str(e))
    backends = getattr(kernels, "backends", None)
    for flag, names, value in (("--disable", args.disable, False), ("--enable", args.enable, True)):
        for name in names:
            if backends is None or not hasattr(backends, name):
                parser.error(f"{flag} {name}: not a fast path in dsmtp.model.kernels.backends")
            setattr(backends, name, value)
    if args.compile:
        torch._dynamo.config.cache_size_limit = 64
    ensure_initialized()
    depths = [cfg.model.mtp_depth] + ([0] if cfg.model.mtp_depth > 0 and not args.no_d0 else [])
    rows = []
    for d in depths:
        print(f"[{args.label}] D={d} ...", flush=True)
        row = run_one(cfg, args, d)
        rows.append(row)
        MetricsLog(args.results).append(row)
    print_table(rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main(sys.argv[1:]))
