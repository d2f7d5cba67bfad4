"""A checkpoint saved in a parallel layout exports to HuggingFace byte for byte as the same model saved
by one process (issues 6 and 20).

Checkpoint A: the tiny MoE + MTP D=2 model of `common.tiny_config`, built in this process, with router
biases set to distinct non-zero values and every norm weight moved off its init of ones (so a dropped,
swapped or re-initialised tensor shows), saved by one process (one shard of full tensors). A parallel
layout under torchrun loads A (each rank reading only its slices) and saves it again without training
(0 optimizer steps: every rank writes its own shard, nothing is consolidated), giving checkpoint B. A and
B are exported (fp32 and bf16; the exporter reads B's shards directly) and every HF tensor must have the
same name, dtype, shape and bytes, and config.json, the index and the shard files must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsmtp.checkpoint import SHARDS, save_weights
from dsmtp.convert.export_hf import INDEX_FILE, export
from dsmtp.model import DeepSeekV3
from dsmtp.parallel.topology import ensure_initialized
from tests.distributed import common
from tests.distributed.launch import run_layout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LAYOUTS = {
    "tp2_pp2_native": (4, {"tp": 2, "pp": 2}, []),
    "ep2_dp2_deepspeed": (2, {"ep": 2}, ["--engine=deepspeed"]),
}


@pytest.fixture(scope="module")
def checkpoint_a(tmp_path_factory) -> Path:
    """The single-process checkpoint, with tensors a default init would not reproduce."""
    cfg = common.tiny_config()
    ensure_initialized()
    torch.manual_seed(common.SEED + 1)  # not the workers' build seed: B holds A's values only if loading works
    model = DeepSeekV3(cfg.model)
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("expert_bias"):
            tensor = torch.randn(tensor.shape, generator=g) * 0.1
        elif name.endswith("norm.weight"):
            tensor = 1 + torch.randn(tensor.shape, generator=g) * 0.1
        state[name] = tensor.detach().float().contiguous()
    biases = [k for k in state if k.endswith("expert_bias")]
    assert len(biases) == 4 and all((state[k] != 0).all() for k in biases)
    return save_weights(tmp_path_factory.mktemp("single") / "ckpt", cfg, state)


def exported_tensors(hf_dir: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
    out = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(hf_dir / file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def assert_same_export(got: Path, want: Path) -> None:
    a, b = exported_tensors(got), exported_tensors(want)
    assert set(a) == set(b), (f"names differ: only in layout export {sorted(set(a) - set(b))[:5]}, "
                              f"only in single-process export {sorted(set(b) - set(a))[:5]}")
    for name in b:
        assert a[name][:2] == b[name][:2], f"{name}: dtype/shape {a[name][:2]} vs {b[name][:2]}"
        assert a[name][2] == b[name][2], f"{name}: bytes differ"
    for file in ("config.json", "generation_config.json", INDEX_FILE):
        assert json.loads((got / file).read_text()) == json.loads((want / file).read_text()), file
    files = sorted(p.name for p in want.glob("model-*.safetensors"))
    assert files == sorted(p.name for p in got.glob("model-*.safetensors"))
    for file in files:
        assert (got / file).read_bytes() == (want / file).read_bytes(), file


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_checkpoint_exports_like_single_process(name, checkpoint_a, tmp_path):
    nproc, layout, extra = LAYOUTS[name]
    run_layout(tmp_path / "run", nproc, layout, extra=[*extra, f"--resume={checkpoint_a}", "--steps=0"])
    ckpt_b = tmp_path / "run" / "ckpt"  # its config is the one its layout ran with; only the model section is exported
    assert len(list((ckpt_b / SHARDS).glob("rank*.safetensors"))) == nproc  # every rank wrote its part
    for dtype in ("fp32", "bf16"):
        want = export(checkpoint_a, tmp_path / f"hf_single_{dtype}", dtype, max_shard_bytes=200_000)
        got = export(ckpt_b, tmp_path / f"hf_{name}_{dtype}", dtype, max_shard_bytes=200_000)
        assert len(list(want.glob("model-*.safetensors"))) > 1  # several shards: the index is exercised
        assert_same_export(got, want)
