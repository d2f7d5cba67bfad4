"""Cross-entropy over the whole vocabulary (one tensor-parallel rank): the compiled path's hand-written
function against PyTorch's, in float64, from bf16 logits, and through torch.compile."""

import torch
import torch.nn.functional as F

from dsmtp.parallel import vocab
from dsmtp.parallel.topology import ensure_initialized
from tests.distributed.launch import relative_error


def test_cross_entropy_values_and_gradients_match_torch_float64():
    ensure_initialized()
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 50, (3, 7))
    weights = torch.rand(3, 7, dtype=torch.float64)  # a per-token weight, as the masked mean applies
    loss = vocab._CrossEntropy.apply(logits, targets)
    (loss * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 7)
    (ref * weights).sum().backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=0, atol=1e-12)


def test_cross_entropy_of_bf16_logits_computes_in_float32():
    """bf16 logits (autocast's output head) give a float32 loss and a bf16 gradient, both within bf16's
    rounding of the float64 values of the same logits."""
    ensure_initialized()
    torch.manual_seed(1)
    logits = (torch.randn(64, 1000) * 3).bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (64,))
    loss = vocab._CrossEntropy.apply(logits, targets)
    loss.sum().backward()
    exact = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(exact, targets, reduction="none")
    ref.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert relative_error(logits.grad, exact.grad) < 1e-2


def test_compiled_cross_entropy_matches_eager():
    """Under torch.compile vocab.cross_entropy runs _CrossEntropy (inductor, on the CPU here): same loss and
    logit gradients as the eager path (PyTorch's F.cross_entropy)."""
    ensure_initialized()
    torch.manual_seed(2)
    logits = torch.randn(2, 9, 300, requires_grad=True)
    targets = torch.randint(0, 300, (2, 9))
    eager = vocab.cross_entropy(logits, targets)
    (eager * torch.arange(18.0).view(2, 9)).sum().backward()
    eager_grad, logits.grad = logits.grad, None
    compiled = torch.compile(vocab.cross_entropy)(logits, targets)
    (compiled * torch.arange(18.0).view(2, 9)).sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(logits.grad, eager_grad)
