"""Router selection against a float64 brute force, bias semantics, aux-loss-free balancing."""

import itertools

import pytest
import torch

from dsmtp.model import DeepSeekV3, moe_layers, update_expert_bias
from dsmtp.model.moe import (MoE, Router, combine_pairs, descending_rank, gather_pairs, sequence_balance_loss,
                             sort_pairs_by_expert, top_k_indices)
from tests.helpers import tiny_model_config


def brute_force_route(x, weight, bias, n_group, topk_group, top_k, scaling):
    """Float64, one token at a time: try every set of kept groups, as the definition reads."""
    scores = torch.sigmoid(x.double() @ weight.double().T)
    biased = scores + bias.double()
    per_group = weight.shape[0] // n_group
    experts, gates = [], []
    for s, b in zip(scores, biased):
        groups = b.view(n_group, per_group)
        group_score = groups.topk(2).values.sum(-1)
        kept = max(itertools.combinations(range(n_group), topk_group), key=lambda gs: sum(group_score[g] for g in gs))
        candidates = [g * per_group + j for g in kept for j in range(per_group)]
        chosen = sorted(candidates, key=lambda e: -b[e])[:top_k]
        g = s[chosen] / s[chosen].sum() * scaling
        experts.append(sorted(chosen))
        gates.append(dict(zip(chosen, g.tolist())))
    return experts, gates


@pytest.mark.parametrize("n_experts, n_group, topk_group, top_k", [(8, 4, 2, 2), (16, 4, 1, 3), (12, 3, 2, 4), (8, 1, 1, 2)])
def test_router_matches_float64_brute_force(n_experts, n_group, topk_group, top_k):
    cfg = tiny_model_config(n_routed_experts=n_experts, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.expert_bias.normal_(std=0.1)
    x = torch.randn(64, cfg.hidden_size)
    expert_ids, gates, _ = router(x)
    ref_experts, ref_gates = brute_force_route(x, router.weight, router.expert_bias, n_group, topk_group, top_k,
                                               cfg.routed_scaling_factor)
    per_group = n_experts // n_group
    for t in range(x.shape[0]):
        picked = expert_ids[t].tolist()
        assert sorted(picked) == ref_experts[t]
        kept_groups = {e // per_group for e in ref_experts[t]}
        assert len(kept_groups) <= topk_group  # never outside the kept groups
        for e, g in zip(picked, gates[t].tolist()):
            assert g == pytest.approx(ref_gates[t][e], rel=1e-5)


@pytest.mark.parametrize("router_dtype", ["fp32", "autocast"])
def test_router_dtype_under_bf16_autocast(router_dtype):
    """model.router_dtype=fp32 keeps the scores at fp32 accuracy under bf16 autocast; autocast computes
    the logits from bf16-rounded operands, rounded to bf16, as a bf16 GEMM does."""
    cfg = tiny_model_config(router_dtype=router_dtype)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, scores = router(x)
    assert scores.dtype == torch.float32
    if router_dtype == "fp32":
        logits = x.double() @ router.weight.double().T
        torch.testing.assert_close(scores.double(), logits.sigmoid(), rtol=1e-5, atol=1e-6)
    else:
        logits = (x.bfloat16().double() @ router.weight.bfloat16().double().T).bfloat16().double()
        # Within one bf16 step (8 significant bits) of the rounded float64 product: the GEMM accumulates
        # in fp32, so an exact product near a rounding boundary may round the other way.
        one_step = logits.abs() * 2.0 ** -7 + 1e-6
        assert ((scores.double().logit() - logits).abs() <= one_step).all()
        fp32_scores = (x.double() @ router.weight.double().T).sigmoid()
        assert (scores.double() - fp32_scores).abs().max() > 1e-4  # the bf16 rounding is visible


def test_descending_rank_by_hand_and_against_topk():
    x = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), float("-inf"), 2.0]])
    assert descending_rank(x).tolist() == [[3, 0, 1, 4, 5, 2]]  # ties, -inf included, in index order
    assert top_k_indices(x, 5).tolist() == [[1, 2, 5, 0, 3]]
    torch.manual_seed(0)
    for shape, k in (((300, 32), 6), ((300, 4), 2), ((100, 4, 8), 2)):
        x = torch.randn(shape)
        assert torch.equal(top_k_indices(x, k), x.topk(k).indices), shape


def test_bias_changes_selection_but_not_gate_values():
    cfg = tiny_model_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(256, cfg.hidden_size)
    ids_before, gates_before, scores = router(x)
    router.expert_bias[5] = 10.0  # expert 5 now wins every selection it is eligible for
    ids_after, gates_after, scores_after = router(x)
    torch.testing.assert_close(scores, scores_after)
    assert (ids_after == 5).any(dim=1).all()
    assert not torch.equal(ids_before.sort(1).values, ids_after.sort(1).values)
    # Gates are the *unbiased* scores of the chosen experts, normalised and scaled.
    chosen = scores.gather(1, ids_after)
    torch.testing.assert_close(gates_after, chosen / chosen.sum(1, keepdim=True) * cfg.routed_scaling_factor)
    unchanged = (ids_before.sort(1).values == ids_after.sort(1).values).all(1)
    same_order_gates = lambda ids, g: g.gather(1, ids.argsort(1))  # noqa: E731
    torch.testing.assert_close(same_order_gates(ids_before, gates_before)[unchanged],
                               same_order_gates(ids_after, gates_after)[unchanged])


def test_bias_updates_balance_a_skewed_router():
    cfg = tiny_model_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(cfg).train()
    with torch.no_grad():
        # Skew: a shared direction that experts 0..3 like a lot, so they take most tokens.
        direction = torch.randn(cfg.hidden_size)
        moe.router.weight.normal_(std=0.1)
        moe.router.weight[:4] += direction / direction.norm() * 3
    x_fixed = torch.randn(512, cfg.hidden_size) + direction / direction.norm()

    def imbalance():
        load = moe.tokens_per_expert
        return (load.max() / load.mean()).item()

    with torch.no_grad():
        moe(x_fixed.view(8, 64, -1))
    start = imbalance()
    update_expert_bias(moe, gamma=0.0)  # only resets the counts
    assert moe.tokens_per_expert.sum() == 0
    for _ in range(300):
        with torch.no_grad():
            moe(x_fixed.view(8, 64, -1))
        last = imbalance()
        update_expert_bias(moe, gamma=0.01)
    assert start > 3.0
    assert last < 1.3, f"max/mean load {last:.2f} after 300 bias updates (started at {start:.2f})"


def test_bias_update_covers_moe_layers_inside_mtp_modules():
    cfg = tiny_model_config(mtp_depth=2)
    model = DeepSeekV3(cfg).train()
    sample = torch.randint(0, cfg.vocab_size, (2, 16 + 3))
    model(sample[:, :16], sample[:, 1:]).loss.backward()
    layers = list(moe_layers(model))
    assert len(layers) == cfg.num_moe_layers + cfg.mtp_depth
    in_mtp = [m for name, m in model.named_modules() if isinstance(m, MoE) and name.startswith("mtp.")]
    assert len(in_mtp) == 2 and all(m.tokens_per_expert.sum() == 2 * 16 * cfg.num_experts_per_tok for m in in_mtp)
    update_expert_bias(model, gamma=0.05)
    for m in layers:
        assert m.router.expert_bias.abs().sum() > 0  # every layer moved its bias, MTP included
        assert m.tokens_per_expert.sum() == 0


def test_sequence_balance_loss_hand_computed():
    # One sequence of 2 tokens, 4 experts, top-1: token 0 -> expert 0, token 1 -> expert 0.
    scores = torch.tensor([[[0.6, 0.2, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]])
    ids = torch.tensor([[[0], [0]]])
    # P = mean of normalised scores = [0.5, 0.3, 0.1, 0.1]; f = count * E / (k * S) = [4, 0, 0, 0].
    assert sequence_balance_loss(scores, ids).item() == pytest.approx(4 * 0.5)


def test_aux_loss_enters_the_loss_when_alpha_positive():
    cfg = tiny_model_config(aux_loss_alpha=0.01, mtp_depth=1)
    model = DeepSeekV3(cfg).train()
    sample = torch.randint(0, cfg.vocab_size, (2, 18))
    out = model(sample[:, :16], sample[:, 1:], mtp_weight=0.3)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss.detach(), out.main_loss + 0.3 * out.mtp_losses.sum() + out.aux_loss)


def test_pair_gather_and_combine_match_a_per_token_loop():
    """Sorted-pair dispatch (gather_pairs' and combine_pairs' hand-written gather backwards) against a
    float64 loop over tokens and their k experts: values, and gradients of the tokens and the gates."""
    torch.manual_seed(0)
    t, k, h, e = 11, 3, 5, 4
    expert_ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    gates = torch.rand(t, k, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(e, h, dtype=torch.float64)  # expert j multiplies its rows by scale[j]
    x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
    order, inverse = sort_pairs_by_expert(expert_ids)
    assert torch.equal(order, expert_ids.flatten().argsort(stable=True))  # ties (one token's pairs) kept in order
    assert torch.equal(order[inverse], torch.arange(t * k))
    rows = gather_pairs(x, order, inverse)
    out = combine_pairs(rows * scale[expert_ids.flatten()[order]], order, inverse, gates)
    x_ref, gates_ref = (v.detach().clone().requires_grad_() for v in (x, gates))
    ref = torch.stack([sum(gates_ref[i, j] * x_ref[i] * scale[expert_ids[i, j]] for j in range(k)) for i in range(t)])
    grad = torch.randn(t, h, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(gates.grad, gates_ref.grad, atol=1e-12, rtol=0)
