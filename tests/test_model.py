"""Model behaviour: causality, MTP targets, gradients, D=0, parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from dsmtp.config import load_config
from dsmtp.model import IGNORE_INDEX, DeepSeekV3
from dsmtp.model.params import count_parameters
from tests.helpers import tiny_model_config


def depth_logits(model, tokens, seq_len):
    hidden, _ = model.hidden_states(tokens, seq_len)
    return [model.logits(h) for h in hidden]


def test_causality_main_and_every_depth():
    cfg = tiny_model_config(mtp_depth=2)
    model = DeepSeekV3(cfg).eval()
    s, d = 12, cfg.mtp_depth
    tokens = torch.randint(0, cfg.vocab_size, (2, s + d))
    base = depth_logits(model, tokens, s)
    for j in (3, 7, s - 1, s + 1):  # also positions only the MTP depths see
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % cfg.vocab_size
        new = depth_logits(model, changed, s)
        for k in range(d + 1):
            first_affected = j - k  # depth k at position i reads t_0 .. t_{i+k}
            if first_affected > 0:
                # Equal up to summation order (expert batches regroup when a later token routes differently).
                torch.testing.assert_close(new[k][:, :first_affected], base[k][:, :first_affected], rtol=0, atol=1e-6)
            if 0 <= first_affected < s:
                assert (new[k][:, first_affected] - base[k][:, first_affected]).abs().max() > 1e-3


def test_each_depth_is_trained_on_the_right_shifted_tokens():
    cfg = tiny_model_config(mtp_depth=2, vocab_size=32)
    model = DeepSeekV3(cfg).eval()
    # Hand-built sequence t_0..t_6 = 10..16: S=4 inputs, D=2, so 4 + 2 + 1 tokens.
    sample = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    out = model(sample[:, :4], sample[:, 1:])
    logits = depth_logits(model, torch.tensor([[10, 11, 12, 13, 14, 15]]), 4)
    expected_targets = {0: [11, 12, 13, 14], 1: [12, 13, 14, 15], 2: [13, 14, 15, 16]}
    losses = [F.cross_entropy(logits[k][0], torch.tensor(expected_targets[k])) for k in range(3)]
    torch.testing.assert_close(out.main_loss, losses[0])
    torch.testing.assert_close(out.mtp_losses, torch.stack(losses[1:]))
    assert out.main_tokens.item() == 4 and out.mtp_tokens.tolist() == [4, 4]


def test_short_labels_give_deeper_depths_fewer_targets():
    cfg = tiny_model_config(mtp_depth=2)
    model = DeepSeekV3(cfg).eval()
    sample = torch.randint(0, cfg.vocab_size, (3, 9))
    out = model(sample[:, :8], sample[:, 1:])  # only S labels: depth k has S - k targets per row
    assert out.mtp_tokens.tolist() == [3 * 7, 3 * 6]
    assert torch.isfinite(out.loss)


def test_mtp_loss_combination_and_per_depth_normalisation():
    cfg = tiny_model_config(mtp_depth=2)
    model = DeepSeekV3(cfg).eval()
    sample = torch.randint(0, cfg.vocab_size, (2, 11))
    labels = sample[:, 1:].clone()
    labels[0, 2:5] = IGNORE_INDEX
    out = model(sample[:, :8], labels, mtp_weight=0.3)
    torch.testing.assert_close(out.loss, out.main_loss + 0.3 / 2 * out.mtp_losses.sum())
    # Masking labels[0, 2:5] removes three targets at every depth (inputs still come from input_ids).
    assert out.main_tokens.item() == 16 - 3
    assert out.mtp_tokens.tolist() == [16 - 3, 16 - 3]


def test_d0_is_plain_next_token_loss():
    cfg = tiny_model_config(mtp_depth=0)
    model = DeepSeekV3(cfg).eval()
    sample = torch.randint(0, cfg.vocab_size, (2, 17))
    out = model(sample[:, :16], sample[:, 1:])
    logits = model(sample[:, :16])
    plain = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), sample[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, plain, rtol=1e-6, atol=1e-6)
    assert out.mtp_losses.numel() == 0 and len(model.mtp) == 0


def _grads(model, sample, mtp_weight):
    model.zero_grad()
    model(sample[:, :16], sample[:, 1:], mtp_weight=mtp_weight).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_gradients_reach_every_used_parameter():
    cfg = tiny_model_config(mtp_depth=2)
    model = DeepSeekV3(cfg).train()
    sample = torch.randint(0, cfg.vocab_size, (4, 16 + 2 + 1))
    grads = _grads(model, sample, mtp_weight=0.3)
    loads = {name.rsplit(".ffn", 1)[0]: moe.tokens_per_expert.clone()
             for name, moe in model.named_modules() if name.endswith("ffn") and hasattr(moe, "router")}
    for name, grad in grads.items():
        if ".experts.w" in name:
            used = loads[name.split(".ffn")[0]] > 0
            assert used.any()
            per_expert = grad.flatten(1).abs().sum(dim=1)
            assert torch.equal(per_expert > 0, used), name  # exactly the experts that got tokens
        else:
            assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
    # The shared embedding and head learn through the MTP path too, and MTP modules only through it.
    main_only = _grads(model, sample, mtp_weight=0.0)
    for name in ("embed.weight", "head.weight"):
        assert not torch.allclose(main_only[name], grads[name])
    assert all(g is None or g.abs().sum() == 0 for n, g in main_only.items() if n.startswith("mtp."))


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_parameter_count_matches_the_built_model(q_lora_rank):
    cfg = tiny_model_config(q_lora_rank=q_lora_rank, mtp_depth=2)
    model = DeepSeekV3(cfg)
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trunk_total == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    unused_experts = cfg.n_routed_experts - cfg.num_experts_per_tok
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert counts.activated == counts.total - (cfg.num_moe_layers + cfg.mtp_depth) * unused_experts * per_expert


def test_deepseek_v3_671b_published_figures():
    counts = count_parameters(load_config("configs/deepseek_v3_671b.yaml").model)
    assert counts.trunk_total == pytest.approx(671e9, rel=0.01)
    assert counts.trunk_total + counts.exported_mtp_total == pytest.approx(685e9, rel=0.01)
    # "14B" of MTP weights is 685B - 671B, each rounded: we get 13.46B (embedding and head copies included).
    assert counts.exported_mtp_total == pytest.approx(13.46e9, rel=0.001)
    # "37B activated": 37.55B counting the input embedding, 36.63B without it (a lookup, not a GEMM).
    assert counts.trunk_activated == pytest.approx(37.55e9, rel=0.001)
    assert counts.trunk_activated - counts.embedding < 37e9 < counts.trunk_activated


def test_small_config_matches_design_figures():
    counts = count_parameters(load_config("configs/small.yaml").model)
    assert counts.trunk_total == pytest.approx(0.69e9, rel=0.01)
    assert counts.trunk_activated == pytest.approx(0.24e9, rel=0.01)
    assert counts.total == pytest.approx(0.75e9, rel=0.01)
    assert counts.activated == pytest.approx(0.26e9, rel=0.01)


def test_dense_mlp_one_gemm_training_matches_two_gemms_in_float64():
    """The dense MLP trains with gate and up as one GEMM over both weights (one rank, no FP8) and decodes
    with two: outputs and every gradient (input, gate, up, down) equal the two-GEMM path's, which also
    runs without gradients."""
    from dsmtp.model.mlp import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 24, init_std=0.2).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert not mlp.split_gemms()
    out = mlp(x)
    out.square().sum().backward()
    fused = [out.detach(), x.grad] + [w.weight.grad for w in (mlp.w1, mlp.w3, mlp.w2)]

    x2 = x.detach().clone().requires_grad_()
    w1, w3, w2 = (w.weight.detach().clone().requires_grad_() for w in (mlp.w1, mlp.w3, mlp.w2))
    ref = F.linear(F.silu(x2 @ w1.T) * (x2 @ w3.T), w2)
    ref.square().sum().backward()
    for got, want in zip(fused, [ref.detach(), x2.grad, w1.grad, w3.grad, w2.grad]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert mlp.split_gemms()
        torch.testing.assert_close(mlp(x), ref.detach(), rtol=1e-12, atol=1e-12)
