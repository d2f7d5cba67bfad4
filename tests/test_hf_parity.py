"""Issue 3: our model equals HF transformers' DeepSeek-V3 on the same weights, through our name mapping.

The HF model is loaded the way users load it: our checkpoint exported with the name mapping
(dsmtp.convert) and read back by `DeepseekV3ForCausalLM.from_pretrained` (which fuses per-expert
tensors itself). One MTP module is compared with `transformers.modeling_layers.MtpLayer`.
"""

from __future__ import annotations

import pytest
import torch
from tests._hf_helpers import random_model, random_tokens, save_checkpoint, tiny_config
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpLayer
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

from dsmtp.convert import names
from dsmtp.convert.export_hf import export

TOL = 1e-4


def export_and_load(model, cfg, tmp_path):
    out = export(save_checkpoint(model, cfg, tmp_path / "ckpt"), tmp_path / "hf", dtype="fp32")
    return DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), out


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "direct_q"])
def test_shapes_from_config_match_the_model(q_lora_rank):
    cfg = tiny_config(q_lora_rank, mtp_depth=2)
    model = random_model(cfg)
    assert names.our_shapes(cfg.model) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "direct_q"])
def test_name_mapping_is_a_bijection(q_lora_rank):
    m = tiny_config(q_lora_rank, mtp_depth=2).model
    hf = names.hf_shapes(m)
    targets = [(n, t) for n in names.our_shapes(m) for t in names.hf_targets(n, m)]
    assert len(hf) == len(targets)  # no two of our tensors write the same HF name
    for ours, t in targets:
        back = names.from_hf(t.hf_name, m)
        assert (back.name, back.index) == (ours, t.index)
        # the embedding / head copies of MTP layers are the only shared tensors
        assert back.shared_copy == t.hf_name.endswith((f"{m.num_layers}.embed_tokens.weight",
                                                       f"{m.num_layers + 1}.embed_tokens.weight",
                                                       "shared_head.head.weight"))
    assert "model.layers.4.shared_head.norm.weight" in hf and "model.layers.5.enorm.weight" not in hf
    with pytest.raises(KeyError, match="model.layers.5.enorm.weight"):
        names.from_hf("model.layers.5.enorm.weight", m)


@pytest.mark.parametrize("q_lora_rank,yarn", [(32, True), (None, True), (32, False), (None, False)],
                         ids=["q_lora-yarn", "direct_q-yarn", "q_lora-no_rope_scaling", "direct_q-no_rope_scaling"])
def test_trunk_logits_match_transformers(tmp_path, q_lora_rank, yarn):
    cfg = tiny_config(q_lora_rank, yarn)
    model = random_model(cfg)
    hf, _ = export_and_load(model, cfg, tmp_path)
    assert hf.config.rope_parameters["rope_type"] == ("yarn" if yarn else "default")
    tokens = random_tokens(cfg)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"trunk parity q_lora_rank={q_lora_rank} yarn={yarn}: max abs diff {diff:.3e}")
    assert ours.abs().max() > 0.5  # logits carry signal, so a small difference means something
    assert diff <= TOL


def mtp_layer_state_dict(hf_dir, layer: int) -> dict[str, torch.Tensor]:
    """HF MtpLayer parameter names from the exported layer-L tensors: the decoder layer goes under
    `mtp_block.` with experts fused as HF holds them in memory, shared_head.norm becomes post_norm; the
    embedding and head copies are the main model's."""
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    prefix = f"model.layers.{layer}."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out = {"enorm.weight": own.pop("enorm.weight"), "hnorm.weight": own.pop("hnorm.weight"),
           "eh_proj.weight": own.pop("eh_proj.weight"), "post_norm.weight": own.pop("shared_head.norm.weight")}
    own.pop("embed_tokens.weight"), own.pop("shared_head.head.weight")
    experts = sorted({int(k.split(".")[2]) for k in own if k.startswith("mlp.experts.")})

    def stack(proj):
        return torch.stack([own.pop(f"mlp.experts.{e}.{proj}.weight") for e in experts])

    out["mtp_block.mlp.experts.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
    out["mtp_block.mlp.experts.down_proj"] = stack("down_proj")
    out.update({f"mtp_block.{k}": v for k, v in own.items()})
    return out


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "direct_q"])
def test_mtp_module_matches_transformers_mtp_layer(tmp_path, q_lora_rank):
    cfg = tiny_config(q_lora_rank, yarn=True)
    model = random_model(cfg)
    hf, hf_dir = export_and_load(model, cfg, tmp_path)
    layer = cfg.model.num_layers
    mtp = MtpLayer(hf.config, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, layer_idx=layer).eval()
    mtp.load_state_dict(mtp_layer_state_dict(hf_dir, layer), strict=True)

    tokens = random_tokens(cfg, seq=33)
    inputs, next_tokens = tokens[:, :-1], tokens[:, 1:]
    s = inputs.shape[1]
    positions = torch.arange(s)
    with torch.no_grad():
        cos, sin = model.rope(positions)
        h0, _ = model.trunk(model.embed(inputs), cos, sin)
        ours, _ = model.mtp[0](h0, model.embed(next_tokens), cos, sin)
        ours_logits = model.logits(ours)

        embeds = hf.model.embed_tokens(next_tokens)
        position_ids = positions[None].expand(inputs.shape[0], -1)
        rope = hf.model.rotary_emb(embeds, position_ids)
        theirs = mtp(embeds, h0, position_embeddings=rope, attention_mask=None, position_ids=position_ids, cache=None)
        theirs_logits = hf.lm_head(theirs)
    hidden_diff = (ours - theirs).abs().max().item()
    logit_diff = (ours_logits - theirs_logits).abs().max().item()
    print(f"MTP parity q_lora_rank={q_lora_rank}: hidden {hidden_diff:.3e}, logits {logit_diff:.3e}")
    assert hidden_diff <= TOL and logit_diff <= TOL
    # the trunk state handed to MTP is the post-norm one both sides use
    assert (hf.model(inputs).last_hidden_state - h0).abs().max() <= TOL
