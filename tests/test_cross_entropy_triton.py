"""dsmtp.model.cross_entropy_triton's kernel run by Triton's interpreter on the CPU (as
tests/test_moe_triton.py does), and kernels.linear_cross_entropy's autograd around it, against float64
references: loss, top-1 hits with ties, the gradient it writes over the logits, and the gradients of the
hidden states and the head's weight for per-row loss gradients (zeros for ignored positions included).
The compiled kernel runs against the model's reference path in tests/gpu/test_gpu_kernels.py."""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from dsmtp.model import kernels


ROWS, VOCAB, HIDDEN = 37, 5000, 48  # the vocabulary spans two of the kernel's blocks, the second partial


@pytest.fixture
def cross_entropy_triton():
    """The module, its kernel run by Triton's interpreter (tests/conftest.py turns it on without CUDA)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off where CUDA is present: tests/gpu runs the compiled kernels")
    return importlib.import_module("dsmtp.model.cross_entropy_triton")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cross_entropy_rows_match_float64(cross_entropy_triton, dtype, tolerance):
    logits = (torch.randn(ROWS, VOCAB, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, (ROWS,))
    targets[:3] = logits[:3].argmax(dim=-1)  # hits
    logits[3, targets[3]] = logits[3].max()  # a tie for the largest logit: a hit, as vocab.top1_correct
    ref = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(ref, targets, reduction="none")
    ref_loss.sum().backward()

    buffer = logits.clone()
    loss, correct = cross_entropy_triton.cross_entropy_rows_(buffer, targets)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    expected = logits.gather(1, targets[:, None]).squeeze(1) >= logits.max(dim=-1).values
    assert correct.tolist() == expected.tolist() and correct[:4].all() and not correct.all()
    torch.testing.assert_close(buffer.double(), ref.grad, rtol=tolerance, atol=tolerance)  # overwritten


def test_linear_cross_entropy_gradients_match_float64(cross_entropy_triton):
    h = torch.randn(2, ROWS, HIDDEN, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.float64) * 0.2
    targets = torch.randint(0, VOCAB, (2, ROWS))
    row_grad = torch.rand(2, ROWS, dtype=torch.float64) * (torch.rand(2, ROWS) > 0.2)  # zero: ignored rows

    ref_h, ref_w = h.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = ref_h @ ref_w.t()
    ref_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, ROWS)
    (ref_loss * row_grad).sum().backward()

    fast_h, fast_w = h.float().requires_grad_(), weight.float().requires_grad_()
    loss, correct = kernels.linear_cross_entropy(fast_h, fast_w, targets)
    (loss * row_grad.float()).sum().backward()
    assert loss.shape == correct.shape == targets.shape and not correct.requires_grad
    assert correct.tolist() == (logits.argmax(dim=-1) == targets).tolist()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_h.grad.double(), ref_h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_w.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-5)


def test_custom_op_passes_opcheck(cross_entropy_triton):
    """Schema (the logits mutated), the fake implementation torch.compile traces with."""
    torch.library.opcheck(kernels._cross_entropy_rows_triton, (torch.randn(5, 300), torch.randint(0, 300, (5,))))


@pytest.mark.parametrize("mtp_kind", ["sequential", "parallel"])
def test_model_losses_through_the_fused_head_match_the_reference_path(cross_entropy_triton, monkeypatch,
                                                                      mtp_kind):
    """DeepSeekV3's losses with the fused head (kernels.fuses_cross_entropy forced on for the CPU, the
    kernel interpreted) against the reference path (the head's linear layer, vocab.cross_entropy and
    vocab.top1_correct): every depth's loss and accuracy, the token counts with ignored labels, every
    gradient; parallel heads run each head's backward inside its forward (torch.autograd.grad)."""
    from dsmtp.model import IGNORE_INDEX, DeepSeekV3
    from tests.helpers import tiny_model_config

    cfg = tiny_model_config(mtp_depth=2, mtp_kind=mtp_kind, vocab_size=300)
    model = DeepSeekV3(cfg).train()
    if mtp_kind == "parallel":
        model.mtp.one_at_a_time = True
    sample = torch.randint(0, cfg.vocab_size, (2, 11))
    labels = sample[:, 1:].clone()
    labels[0, 2:5] = IGNORE_INDEX
    results = []
    for fused in (False, True):
        monkeypatch.setattr(kernels, "fuses_cross_entropy", lambda h, fused=fused: fused)
        model.zero_grad(set_to_none=True)
        out = model(sample[:, :8], labels, mtp_weight=0.3)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (ref, ref_grads), (out, grads) = results
    for name in ("loss", "main_loss", "mtp_losses", "main_accuracy", "mtp_accuracies"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
    assert out.main_tokens.item() == ref.main_tokens.item() == 16 - 3
    assert len(grads) == len(ref_grads)
    for fast, slow in zip(grads, ref_grads):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)
