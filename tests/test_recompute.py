"""Activation recomputation (train.activation_recompute_every): same loss, gradients and expert token
counts as keeping every activation, and less saved for backward."""

from __future__ import annotations

import torch

from dsmtp.model import DeepSeekV3, moe_layers
from dsmtp.parallel.topology import ensure_initialized
from tests.helpers import tiny_model_config


def step(model: DeepSeekV3, ids: torch.Tensor, every: int):
    """(loss, grads, per-layer token counts, bytes saved for backward) of one forward + backward."""
    model.set_activation_recompute(every)
    model.zero_grad(set_to_none=True)
    for moe in moe_layers(model):
        moe.tokens_per_expert.zero_()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids[:, :-2], ids[:, 1:], mtp_weight=0.3)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    counts = [moe.tokens_per_expert.clone() for moe in moe_layers(model)]
    return out.loss.detach(), grads, counts, saved


def test_recompute_matches_keeping_activations():
    ensure_initialized()
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_model_config(num_layers=3, mtp_depth=1)).double().train()
    ids = torch.randint(0, 128, (2, 24 + 2))
    loss, grads, counts, saved_none = step(model, ids, 0)
    saved = {}
    for every in (1, 2):
        loss_r, grads_r, counts_r, saved[every] = step(model, ids, every)
        assert torch.allclose(loss_r, loss, atol=1e-12, rtol=0)
        assert grads_r.keys() == grads.keys()
        for name in grads:
            assert torch.allclose(grads_r[name], grads[name], atol=1e-12, rtol=0), (every, name)
        # The recomputed forward must not count its tokens a second time (bias updates use the counts).
        assert all(torch.equal(a, b) for a, b in zip(counts_r, counts)), every
    assert saved[1] < saved[2] < saved_none
    model.set_activation_recompute(2)  # layers 2 and 4: the second trunk layer and the MTP module's
    assert [layer.recompute for layer in [*model.layers, model.mtp[0].layer]] == [False, True, False, True]
