"""CPU checks of what the GPU speed paths rely on: the sync-free expert dispatch, the FP8
quantizers' scale layout and error, the benchmark's FLOP formula (docs/design.md), and the
FP8-vs-bf16 loss comparison."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dsmtp.config import ModelConfig, load_config
from dsmtp.model import fp8
from dsmtp.model.moe import RoutedExperts, count_tokens, dispatch_local

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_cross_entropy  # noqa: E402
import bench_moe_kernels  # noqa: E402
import bench_optimizer_update  # noqa: E402
import bench_train  # noqa: E402
import fp8_vs_bf16  # noqa: E402


def test_dispatch_local_matches_per_token_loop():
    cfg = ModelConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3)
    experts = RoutedExperts(cfg).double()
    x = torch.randn(20, 32, dtype=torch.float64)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(20)])
    gates = torch.rand(20, 3, dtype=torch.float64)
    out = dispatch_local(x, ids, gates, experts)
    ref = torch.zeros_like(x)
    for t in range(20):
        for j in range(3):
            e = ids[t, j]
            h = torch.nn.functional.silu(x[t] @ experts.w13[e, 0].T) * (x[t] @ experts.w13[e, 1].T)
            ref[t] += gates[t, j] * (h @ experts.w2[e].T)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(count_tokens(ids, 8), torch.bincount(ids.flatten(), minlength=8))


def test_fp8_quantizers_layout_and_error():
    x = torch.randn(256, 384) * torch.logspace(-3, 3, 384)  # tiles of very different ranges
    q, scale = fp8.quantize_tiles(x)
    assert q.dtype == fp8.E4M3 and scale.shape == (256, 3) and scale.stride() == (1, 256)
    step = scale.repeat_interleave(128, dim=1)
    back = q.float() * step
    # e4m3 rounds to 3 mantissa bits (half a unit: 2^-4 relative); below its smallest normal the
    # spacing is 2^-9 in scaled units. Every tile uses its own range: no tile's error follows another's.
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + step * 2 ** -10).all()
    w = torch.randn(256, 384)
    q, scale = fp8.quantize_blocks(w)
    assert scale.shape == (2, 3)
    back = q.float() * scale.repeat_interleave(128, dim=0).repeat_interleave(128, dim=1)
    assert (back - w).norm() / w.norm() < 4e-2


def test_flops_per_token_matches_design():
    for depth, gflop in ((0, 1.63), (1, 1.95)):
        m = load_config("configs/small.yaml", [f"model.mtp_depth={depth}"]).model
        assert abs(bench_train.flops_per_token(m, 4096) / 1e9 - gflop) < 0.01


def test_fp8_group_padding_round_trip_and_gradient():
    """pad_groups puts each expert's rows at a multiple of GROUP_ALIGN with zeros between groups;
    unpad_groups takes them back, and the gradient comes back to every row unchanged."""
    counts = torch.tensor([3, 0, 17, 16, 1])
    x = torch.randn(int(counts.sum()), 4, dtype=torch.float64, requires_grad=True)
    padded, ends, dest = fp8.pad_groups(x, counts)
    assert ends.tolist() == [16, 16, 48, 64, 80]
    starts = [0, 16, 16, 48, 64]
    for e, (start, n) in enumerate(zip(starts, counts.tolist())):
        first = int(counts[:e].sum())
        assert torch.equal(padded[start:start + n], x[first:first + n])
    assert int((padded.abs().sum(dim=1) > 0).sum()) == x.shape[0]  # everything else is padding
    grad = torch.randn_like(x)
    fp8.unpad_groups(padded, dest).backward(grad)
    assert torch.equal(x.grad, grad)


def test_fp8_vs_bf16_tail_means_hand_computed(tmp_path):
    """Records every 10 steps; the last-20-step window holds the records of steps 30 and 40."""
    runs = {"bf16": [4.0, 3.0, 2.0, 2.0], "fp8": [4.0, 3.0, 2.02, 2.04]}
    for name, losses in runs.items():
        (tmp_path / name).mkdir()
        records = [dict(kind="train", step=10 * (i + 1), loss=loss, tokens_per_second=100.0 + i)
                   for i, loss in enumerate(losses)] + [dict(kind="eval", step=40, loss=2.5)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = fp8_vs_bf16.compare([tmp_path / "bf16", tmp_path / "fp8"], tail_steps=20)
    assert [r["tail_loss"] for r in rows] == pytest.approx([2.0, 2.03])
    assert abs(rows[1]["relative_difference"] - 0.015) < 1e-12 and rows[0]["relative_difference"] == 0
    assert rows[1]["val_loss"] == 2.5
    fp8_vs_bf16.plot(rows, 20, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 0 and not list(tmp_path.glob("*.tmp.png"))


def test_kernel_families_count_each_kernel_once_on_its_launching_op():
    """Hand-made profiler events: device-side kernel events, labelled ranges and the runtime's "Command
    Buffer Full" waits are not counted again; compiled Triton kernels named after a fused grouped_mm
    cast are not grouped GEMMs; kernels no op launched (a Triton kernel called from Python) are "no op":
    all device events' time (user annotations aside) less the attributed."""
    from types import SimpleNamespace

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    launched = [("aten::_cudnn_attention_backward", "cudnn_generated_fort_native_sdpa_bprop", 3000),
                ("aten::_grouped_mm", "cutlass_grouped_gemm", 2000),
                ("triton_poi_fused__grouped_mm__to_copy_cat", "triton_poi_fused__grouped_mm__to_copy_cat", 500),
                ("aten::mm", "nvjet_gemm", 1000), ("aten::_fused_adamw_", "multi_tensor_apply_kernel", 800),
                ("aten::_foreach_norm", "multi_tensor_apply_kernel", 200), ("aten::sort", "radix_sort", 100)]
    events = [SimpleNamespace(name=n, device_type=d, self_device_time_total=t, is_user_annotation=a)
              for n, d, t, a in [
                  *((op, cpu, t, False) for op, _, t in launched), *((k, cuda, t, False) for _, k, t in launched),
                  ("cat::attention", cpu, 9999, True), ("cat::attention", cuda, 3000, True), ("aten::add", cpu, 0, False),
                  ("Command Buffer Full", cpu, 5000, False), ("_adamw_blocks", cuda, 1400, False)]]
    ms = bench_train.kernel_families(SimpleNamespace(events=lambda: events), steps=2)
    assert ms == pytest.approx({"attention": 1.5, "grouped GEMM": 1.0, "GEMM": 0.5, "optimizer": 0.5, "other": 0.3,
                                "no op": 0.7})


def test_peer_table_compares_rows_of_the_same_mtp_depth(tmp_path, capsys):
    """bench_train --table --peer: each compiled dsmtp row against torchtitan's variant of its MTP depth,
    ratios computed from the two files (numbers made up); a row whose loss was not finite gets none."""
    base = dict(precision="bf16", compile=True, mtp_kind="sequential", device="H200", step_ms=100.0, tflops=300.0,
                mfu=0.3, loss=10.0)
    rows = [dict(base, label="flash", mtp_depth=1, tokens_per_s=200_000.0, peak_mem_gib=20.0),
            dict(base, label="flash", mtp_depth=0, tokens_per_s=230_000.0, peak_mem_gib=18.0),
            dict(base, label="just under", mtp_depth=1, tokens_per_s=199_952.0, peak_mem_gib=20.0),
            dict(base, label="eager", compile=False, mtp_depth=1, tokens_per_s=1.0, peak_mem_gib=1.0),
            dict(base, label="diverged", mtp_depth=1, tokens_per_s=300_000.0, peak_mem_gib=20.0, loss=None)]
    results, peer = tmp_path / "rows.jsonl", tmp_path / "tt.json"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    peer.write_text(json.dumps([{"variant": "compile", "tokens_per_s": 184_000.0, "peak_mem_gib": 30.0},
                                {"variant": "compile+mtp1", "tokens_per_s": 160_000.0, "peak_mem_gib": 33.0},
                                {"variant": "eager", "error": "timeout"}]))
    assert bench_train.main(["--table", str(results), "--peer", str(peer)]) == 0
    lines = capsys.readouterr().out.split("against torchtitan")[1].splitlines()[2:]
    assert len(lines) == 3  # the eager row has no compiled peer; a non-finite loss's speed is no result
    assert "compile+mtp1" in lines[0] and "1.2500x" in lines[0]
    assert lines[1].split()[3] == "compile" and "1.2500x" in lines[1]
    assert "1.2497x" in lines[2]  # four decimals: the goals sit at 1.25x, and 1.2497 is not 1.250


def test_table_prints_each_phase_span_and_the_host_time(tmp_path, capsys):
    """bench_train --table: the phase spans a run recorded, in PHASES order, and --only keeps the rows
    whose label starts with the prefix (numbers made up)."""
    base = dict(precision="bf16", compile=True, mtp_kind="sequential", device="H200", tflops=300.0, mfu=0.3,
                loss=10.0, mtp_depth=1, tokens_per_s=170_000.0, peak_mem_gib=20.0)
    rows = [dict(base, label="s1 a long label that must not be cut", step_ms=96.0, host_issue_ms=91.5,
                 phase_ms={"forward+backward": 80.0, "clip+update": 12.5, "zero_grad+bias": 3.5}),
            dict(base, label="s0 old", step_ms=99.0)]
    results = tmp_path / "rows.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench_train.main(["--table", str(results), "--only", "s1 "]) == 0
    out = capsys.readouterr().out
    assert "s0 old" not in out
    line = out.split("host's time to issue a step from an idle GPU:")[1].splitlines()[2]
    assert line.startswith("s1 a long label that must not be cut ")
    assert line.split()[-4:] == ["80.0", "12.5", "3.5", "91.5"]


def test_optimizer_update_table_from_its_results_file(tmp_path, capsys):
    """bench_optimizer_update --table: one line per row, bandwidth = bytes moved over time (made-up rows)."""
    row = dict(device="H200", config="small.yaml", update="multi_tensor_adamw, bf16 moments", block=512,
               num_warps=4, ms=4.0, gb_moved=15.0, diff_vs_first=0.0)
    results = tmp_path / "rows.jsonl"
    results.write_text(json.dumps(dict(row, update="torch fused AdamW", block=None, num_warps=None, ms=6.0,
                                       gb_moved=21.0, diff_vs_first=None)) + "\n" + json.dumps(row) + "\n"
                       + json.dumps(dict(row, param_dtype="bf16", block=1024, iters=4, ms=5.0)) + "\n")
    bench_optimizer_update.main(["--table", str(results)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "H200, small.yaml" and len(lines) == 6
    assert lines[3] == "| torch fused AdamW | fp32 | - | - | - | 6.000 | 21.0 | 3.50 | - |"
    assert lines[4] == "| multi_tensor_adamw, bf16 moments | fp32 | 512 | 4 | 1 | 4.000 | 15.0 | 3.75 | 0.0e+00 |"
    assert lines[5] == "| multi_tensor_adamw, bf16 moments | bf16 | 1024 | 4 | 4 | 5.000 | 15.0 | 3.00 | 0.0e+00 |"


def test_moe_kernels_table_from_its_results_file(tmp_path, capsys):
    """bench_moe_kernels --table: one line per row, each gradient's difference in NAMES order (made-up rows)."""
    diffs = dict(zip(bench_moe_kernels.NAMES, [0.0, 5.5e-3, 5.1e-3, 0.0, 5.3e-3]))
    row = dict(device="H200", config="small.yaml", path="quack", ms=2.25, relative_difference=diffs)
    results = tmp_path / "rows.jsonl"
    results.write_text(json.dumps(dict(row, path="torch", ms=2.1451)) + "\n" + json.dumps(row) + "\n")
    bench_moe_kernels.main(["--table", str(results)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "H200, small.yaml" and len(lines) == 5
    assert lines[3].startswith("| torch | 2.145 | ")
    assert lines[4] == "| quack | 2.250 | 0.0e+00 | 5.5e-03 | 5.1e-03 | 0.0e+00 | 5.3e-03 |"


def test_cross_entropy_table_from_its_results_file(tmp_path, capsys):
    """bench_cross_entropy --table: one line per row with time, peak memory and the differences (made-up rows)."""
    row = dict(device="H200", config="small.yaml", path="fused", ms=5.3651, peak_gib=1.125,
               relative_difference=dict(zip(bench_cross_entropy.NAMES, [7.4e-8, 1.6e-3, 1.8e-3])))
    results = tmp_path / "rows.jsonl"
    torch_row = dict(row, path="torch", ms=5.881, relative_difference={})
    results.write_text(json.dumps(torch_row) + "\n" + json.dumps(row) + "\n")
    bench_cross_entropy.main(["--table", str(results)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "H200, small.yaml, one head" and len(lines) == 5
    assert lines[3].startswith("| torch | 5.881 | 1.12 |")
    assert lines[4] == "| fused | 5.365 | 1.12 | 7.4e-08 | 1.6e-03 | 1.8e-03 |"


def test_table_marks_a_row_whose_loss_was_not_finite(tmp_path, capsys):
    """A run whose loss went non-finite (written as null) prints nan and is named as no result: its step
    time may be that of a broken step (numbers made up)."""
    base = dict(precision="bf16", compile=True, mtp_kind="sequential", device="H200", tflops=300.0, mfu=0.3,
                mtp_depth=1, tokens_per_s=170_000.0, peak_mem_gib=20.0, step_ms=96.0)
    results = tmp_path / "rows.jsonl"
    results.write_text(json.dumps(dict(base, label="good", loss=10.0)) + "\n"
                       + json.dumps(dict(base, label="broken", loss=None)) + "\n")
    assert bench_train.main(["--table", str(results)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[3].split()[-1] == "nan"
    assert "not finite loss (its speed is not a result): broken D=1" in out and "good D=1" not in out
