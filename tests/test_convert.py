"""Issue 6: conversion to and from the HuggingFace DeepSeek-V3 format, MTP layers included."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml
from tests._hf_helpers import random_model, random_tokens, read_checkpoint, save_checkpoint, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

from dsmtp.checkpoint import CheckpointError, save_weights
from dsmtp.config import ConfigError, load_config
from dsmtp.convert import fp8, names
from dsmtp.convert.export_hf import export
from dsmtp.convert.hf_config import UnsupportedHFConfig, from_hf_config, to_hf_config
from dsmtp.convert.import_hf import import_hf

TOL = 1e-4
STDLIB = Path(json.__file__).parent.parent


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A small sentencepiece model trained like dsmtp's: BPE, byte fallback, pad/bos/eos = 0/1/2, identity
    normalization, no dummy prefix, whitespace kept (code indentation)."""
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "sp"), vocab_size=384, model_type="bpe", byte_fallback=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=1.0, minloglevel=2)
    return d / "sp.model"


def read_dir(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def trained_model(cfg, steps: int = 25):
    """A briefly trained model (repeating a fixed token pattern), so greedy decoding has clear winners."""
    model = random_model(cfg)
    model.train()
    pattern = random_tokens(cfg, batch=1, seq=12, seed=7)
    data = pattern.repeat(4, 5)[:, :cfg.model.mtp_depth + 41]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(data[:, :40], data[:, 1:], mtp_weight=0.3).loss.backward()
        opt.step()
    return model.eval(), pattern


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, eos_id: int = 2, pad_id: int = 0) -> torch.Tensor:
    """Plain greedy decoding with our model (full recompute each step); finished rows continue with pad, as
    transformers' generate does."""
    ids, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        nxt = model(ids)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if done.all():
            break
    return ids


def test_export_loads_in_transformers_with_same_logits_generation_and_mtp(tmp_path, sp_model):
    cfg = tiny_config(q_lora_rank=32, yarn=True)
    model, pattern = trained_model(cfg)
    save_checkpoint(model, cfg, tmp_path / "run" / "checkpoints" / "step_00000025", sp_model)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000025\n")
    out = export(tmp_path / "run", tmp_path / "hf", dtype="fp32", max_shard_bytes=300_000)

    # layout: bounded shards with an index, config and generation config as serving engines read them
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
        assert nbytes <= 300_000 or len(sizes) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["rope_scaling"]["type"] == "yarn"
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    L = cfg.model.num_layers
    assert {f"model.layers.{L}.{n}" for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
            "shared_head.norm.weight", "shared_head.head.weight", "embed_tokens.weight")} <= set(index["weight_map"])
    with safe_open(str(out / index["weight_map"][f"model.layers.{L - 1}.mlp.gate.e_score_correction_bias"]), "pt") as f:
        bias = f.get_tensor(f"model.layers.{L - 1}.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and torch.equal(bias, model.layers[L - 1].ffn.router.expert_bias)

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = random_tokens(cfg)
    with torch.no_grad():
        logit_diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"export logits: max abs diff {logit_diff:.3e}")
    assert logit_diff <= TOL

    prompt = torch.cat([pattern[:, :6], random_tokens(cfg, batch=1, seq=6, seed=3)])
    ours = greedy(model, prompt, 32)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert ours.shape[1] > prompt.shape[1] + 8 and torch.equal(ours, theirs[:, :ours.shape[1]])
    assert theirs.shape[1] == ours.shape[1] or (theirs[:, ours.shape[1]:] == 0).all()

    # transformers' MtpModel on the exported layer-L tensors. It looks for MTP keys with the pattern
    # the model class declares (layer 61, the 671B layout); point it at this model's layer L.
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]
    mtp_model = MtpModel.from_pretrained(hf).eval()
    inputs, next_tokens = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1])
    with torch.no_grad():
        cos, sin = model.rope(positions)
        h0, _ = model.trunk(model.embed(inputs), cos, sin)
        ours_mtp = model.logits(model.mtp[0](h0, model.embed(next_tokens), cos, sin)[0])
        h_hf = hf.model(inputs).last_hidden_state
        theirs_h = mtp_model.forward_layer(0, h_hf, positions[None].expand(len(inputs), -1), None, input_ids=next_tokens)
        theirs_mtp = mtp_model._project_to_logits(theirs_h)
    mtp_diff = (ours_mtp - theirs_mtp).abs().max().item()
    print(f"MtpModel logits: max abs diff {mtp_diff:.3e}")
    assert mtp_diff <= TOL
    # transformers' MTP speculative decoding (batch 1) on the exported MTP layer gives our greedy output
    speculative = hf.generate(prompt[:1], max_new_tokens=32, do_sample=False, use_mtp=True)
    assert torch.equal(speculative, greedy(model, prompt[:1], 32))

    # the tokenizer: same ids as sentencepiece on real source text
    tok = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = (STDLIB / "textwrap.py").read_text() + '\n\tx = "héllo wörld, 日本語 🙂"\r\n  \n\n   <s></s> end  '
    for sample in (text, " leading space", "\ttab\n\n    indented", "Ünïcödé ∑ 🙂", ""):
        assert tok.encode(sample) == sp.encode(sample)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.decode(sp.encode(text)) == text


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "direct_q"])
def test_round_trip_ours_hf_ours_is_bit_exact(tmp_path, sp_model, q_lora_rank):
    cfg = tiny_config(q_lora_rank, yarn=q_lora_rank is None, mtp_depth=2)
    model = random_model(cfg)
    save_checkpoint(model, cfg, tmp_path / "ckpt", sp_model)
    hf_dir = export(tmp_path / "ckpt", tmp_path / "hf", dtype="fp32")
    back = import_hf(hf_dir, tmp_path / "back", overrides=["parallel.tp=2", "train.lr=1e-4"])
    assert_same_tensors(read_checkpoint(back), model.state_dict())
    cfg_back = load_config(back / "config.yaml")
    assert cfg_back.model == cfg.model and cfg_back.parallel.tp == 2 and cfg_back.train.lr == 1e-4
    assert (back / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    manifest = json.loads((back / "manifest.json").read_text())
    assert set(manifest["files"]) == {"index.json", "config.yaml", "tokenizer.model"}


def test_round_trip_hf_ours_hf_preserves_every_tensor(tmp_path):
    # A checkpoint written by transformers itself (bf16, per-expert names, rope_parameters style, no MTP) ...
    cfg = tiny_config(q_lora_rank=32, yarn=True, mtp_depth=0)
    hf_config = DeepseekV3Config(**{**to_hf_config(cfg.model), "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    native = DeepseekV3ForCausalLM(hf_config).to(torch.bfloat16)
    for layer in native.model.layers[cfg.model.first_k_dense_replace:]:  # float32 router bias, as released
        layer.mlp.gate.e_score_correction_bias.data = torch.randn(cfg.model.n_routed_experts) * 0.05
    native.save_pretrained(tmp_path / "native")
    back = export(import_hf(tmp_path / "native", tmp_path / "ours"), tmp_path / "again", dtype="bf16")
    assert_same_tensors(read_dir(back), read_dir(tmp_path / "native"))

    # ... and one with MTP layers (depth 2), written by our exporter in bf16.
    cfg = tiny_config(q_lora_rank=None, yarn=True, mtp_depth=2)
    first = export(save_checkpoint(random_model(cfg), cfg, tmp_path / "ckpt"), tmp_path / "hf", dtype="bf16")
    again = export(import_hf(first, tmp_path / "ours2"), tmp_path / "hf2", dtype="bf16")
    assert_same_tensors(read_dir(again), read_dir(first))
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())


def released_layer_61() -> dict[str, tuple[int, ...]]:
    """The MTP layer of the released DeepSeek-V3 checkpoint (model.safetensors.index.json of
    deepseek-ai/DeepSeek-V3, bf16 names; the fp8 release adds weight_scale_inv next to the projections)."""
    h, vocab, experts, moe_i = 7168, 129280, 256, 2048
    p = "model.layers.61."
    layout = {
        "embed_tokens.weight": (vocab, h), "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
        "shared_head.norm.weight": (h,), "shared_head.head.weight": (vocab, h),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_a_proj.weight": (1536, h), "self_attn.q_a_layernorm.weight": (1536,),
        "self_attn.q_b_proj.weight": (128 * 192, 1536), "self_attn.kv_a_proj_with_mqa.weight": (576, h),
        "self_attn.kv_a_layernorm.weight": (512,), "self_attn.kv_b_proj.weight": (128 * 256, 512),
        "self_attn.o_proj.weight": (h, 128 * 128),
        "mlp.gate.weight": (experts, h), "mlp.gate.e_score_correction_bias": (experts,),
        "mlp.shared_experts.gate_proj.weight": (moe_i, h), "mlp.shared_experts.up_proj.weight": (moe_i, h),
        "mlp.shared_experts.down_proj.weight": (h, moe_i),
    }
    for e in range(experts):
        layout.update({f"mlp.experts.{e}.gate_proj.weight": (moe_i, h), f"mlp.experts.{e}.up_proj.weight": (moe_i, h),
                       f"mlp.experts.{e}.down_proj.weight": (h, moe_i)})
    return {p + k: v for k, v in layout.items()}


def test_671b_mtp_tensor_names_and_shapes_match_the_release():
    cfg = load_config("configs/deepseek_v3_671b.yaml").model
    shapes = names.hf_shapes(cfg)  # from the config alone: nothing is allocated
    assert {k: v for k, v in shapes.items() if k.startswith("model.layers.61.")} == released_layer_61()
    assert not any(k.startswith("model.layers.62.") for k in shapes)
    # per layer: 7 attention tensors + 2 norms; dense MLP 3; MoE 256 x 3 experts + gate, bias, 3 shared
    assert len(shapes) == 61 * 9 + 3 * 3 + 58 * (256 * 3 + 5) + 3 + len(released_layer_61())


def test_exporter_reads_through_a_tensor_source(tmp_path):
    """The seam a sharded (TP/PP/EP/ZeRO) checkpoint reader plugs into: any TensorSource giving full tensors in
    our names exports to exactly the same files."""
    cfg = tiny_config(mtp_depth=1)
    model = random_model(cfg)
    ckpt = save_checkpoint(model, cfg, tmp_path / "ckpt")
    state = model.state_dict()

    class InMemory:
        def shapes(self):
            return {k: tuple(v.shape) for k, v in state.items()}

        def read(self, name, index=()):
            return state[name][index]

    a = export(ckpt, tmp_path / "a", dtype="bf16")
    b = export(ckpt, tmp_path / "b", dtype="bf16", source=InMemory())
    for shard in sorted(a.glob("*.safetensors")):
        assert shard.read_bytes() == (b / shard.name).read_bytes()


def test_clear_errors(tmp_path):
    cfg = tiny_config(mtp_depth=1)
    model = random_model(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    # a checkpoint missing a tensor
    del state["layers.2.ffn.experts.w2"]
    ckpt = save_weights(tmp_path / "ckpt", cfg, state)
    with pytest.raises(ValueError, match=r"missing tensors: layers\.2\.ffn\.experts\.w2"):
        export(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    # an HF checkpoint declaring an MTP layer it does not have (transformers' default num_nextn_predict_layers=1)
    native = DeepseekV3ForCausalLM(DeepseekV3Config(**{**to_hf_config(cfg.model), "num_nextn_predict_layers": 1}))
    native.save_pretrained(tmp_path / "native")
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.3\.embed_tokens\.weight, .*model\.layers\.3\.enorm\.weight"):
        import_hf(tmp_path / "native", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # MTP copies of the embedding that differ from the embedding
    good = export(save_checkpoint(model, cfg, tmp_path / "ckpt2"), tmp_path / "hf2", dtype="fp32")
    index = json.loads((good / "model.safetensors.index.json").read_text())
    shard = good / index["weight_map"]["model.layers.3.embed_tokens.weight"]
    tensors = load_file(str(shard))
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.layers.3.embed_tokens.weight"] + 1
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"model\.layers\.3\.embed_tokens\.weight differs from model\.embed_tokens"):
        import_hf(good, tmp_path / "out")

    # fields the model cannot represent, each named
    base = to_hf_config(cfg.model)
    for field, value, pattern in [
        ("scoring_func", "softmax", "scoring_func"),
        ("quantization_config", {"quant_method": "bitsandbytes"}, "quantization_config"),
        ("rope_scaling", {"type": "llama3", "factor": 8.0}, "rope_scaling.rope_type"),
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("model_type", "deepseek_v2", "model_type"),
    ]:
        with pytest.raises(UnsupportedHFConfig, match=pattern):
            from_hf_config({**base, field: value})
    # not a checkpoint at all
    with pytest.raises(CheckpointError, match="not a dsmtp checkpoint"):
        export(tmp_path / "nowhere", tmp_path / "hf3")
    # the architecture comes from config.json, not from --set
    with pytest.raises(ConfigError, match="model.num_layers"):
        import_hf(good, tmp_path / "out", overrides=["model.num_layers=2"])


def test_cli_commands(tmp_path, capsys):
    from dsmtp.cli import main

    cfg = tiny_config(mtp_depth=1)
    ckpt = save_checkpoint(random_model(cfg), cfg, tmp_path / "ckpt")
    assert main(["export-hf", str(ckpt), str(tmp_path / "hf"), "--dtype", "fp32", "--max-shard-size", "1MB"]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back"), "--set", "parallel.tp=2"]) == 0
    assert_same_tensors(read_checkpoint(tmp_path / "back"), read_checkpoint(ckpt))
    assert yaml.safe_load((tmp_path / "back" / "config.yaml").read_text())["parallel"]["tp"] == 2


def test_fp8_export_in_the_released_layout_dequantizes_within_bound(tmp_path):
    cfg = tiny_config(q_lora_rank=32, mtp_depth=1)
    model = random_model(cfg)
    out = export(save_checkpoint(model, cfg, tmp_path / "ckpt"), tmp_path / "hf", quantize_fp8=True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    tensors = read_dir(out)
    m = cfg.model
    for hf_name, shape in names.hf_shapes(m).items():
        where = names.from_hf(hf_name, m)
        original = model.state_dict()[where.name]
        original = original[where.index]
        if fp8.is_quantized(hf_name):
            q, scale = tensors[hf_name], tensors[hf_name + "_scale_inv"]
            assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert scale.shape == tuple(-(-d // 128) for d in shape)
            # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus half a subnormal step near zero
            step = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]
            error = (fp8.dequantize(q, scale) - original).abs()
            assert (error <= original.abs() * 2**-4 + step * 2**-10).all(), hf_name
        else:
            expected = original.float() if hf_name.endswith("e_score_correction_bias") else original.bfloat16()
            assert torch.equal(tensors[hf_name], expected), hf_name
    assert {n for n in tensors if n.endswith("_scale_inv")} == {n + "_scale_inv" for n in names.hf_shapes(m)
                                                                if fp8.is_quantized(n)}
    assert not fp8.is_quantized("model.layers.3.eh_proj.weight") and fp8.is_quantized("model.layers.3.mlp.experts.0.up_proj.weight")

    # import dequantizes: every weight comes back as the dequantized fp8 value
    back = read_checkpoint(import_hf(out, tmp_path / "back"))
    name = "layers.2.ffn.experts.w13"
    for e in range(m.n_routed_experts):
        hf_name = f"model.layers.2.mlp.experts.{e}.gate_proj.weight"
        assert torch.equal(back[name][e, 0], fp8.dequantize(tensors[hf_name], tensors[hf_name + "_scale_inv"]))


@pytest.mark.parametrize("path", ["configs/tiny.yaml", "configs/small.yaml", "configs/deepseek_v3_671b.yaml"])
def test_config_json_round_trip_and_released_style(path):
    m = load_config(path).model
    config = to_hf_config(m)
    assert from_hf_config(json.loads(json.dumps(config)))[0] == m
    # transformers reads the same architecture from it
    hf = DeepseekV3Config(**config)
    assert (hf.num_hidden_layers, hf.num_nextn_predict_layers, hf.q_lora_rank, hf.rope_interleave) == \
        (m.num_layers, m.mtp_depth, m.q_lora_rank, True)
    assert hf.rope_parameters["rope_type"] == ("default" if m.rope_scaling is None else "yarn")


def test_released_config_json_is_read():
    """The fields of deepseek-ai/DeepSeek-V3's config.json (legacy rope_scaling with "type", fp8 quantization)."""
    released = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    }
    m, quant = from_hf_config(released)
    ours = load_config("configs/deepseek_v3_671b.yaml").model
    assert quant["quant_method"] == "fp8"
    assert dataclasses.replace(m, aux_loss_alpha=ours.aux_loss_alpha, init_std=ours.init_std) == ours
