"""istr_viz.model.activations: the ELU has torch's values and gradients on either CPU kernel."""

import time

import pytest
import torch
import torch.nn.functional as F

from istr_viz.model.activations import ELU, elu


@pytest.mark.parametrize("library", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_values_and_gradients_equal_torch_elu(dtype, atol, library):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 49, 8, generator=g) * 4).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, -80.0, 80.0, -1e-4])  # zero, far negative, far positive, tiny
    upstream = torch.randn(x.shape, generator=g).to(dtype)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = elu(ours_in, library), F.elu(ref_in)
    assert ours.dtype == ref.dtype == dtype
    assert torch.allclose(ours.float(), ref.float(), atol=atol, rtol=1e-2)
    ours.backward(upstream)
    ref.backward(upstream)
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), atol=atol, rtol=1e-2)
    assert ours[0, 0, 2] == 80.0 and ours[0, 0, 1] == -1.0  # exact on the positive side


def test_module_has_no_parameters_and_matches_nn_elu():
    x = torch.linspace(-5, 5, 101)
    assert list(ELU().parameters()) == []
    assert torch.allclose(ELU()(x), torch.nn.ELU()(x), atol=1e-6)


def test_inference_skips_the_autograd_function_and_training_uses_it(monkeypatch):
    from istr_viz.model import activations

    calls = []
    real = activations._ELUFunction.apply
    monkeypatch.setattr(activations._ELUFunction, "apply",
                        lambda t: calls.append(t.shape) or real(t))
    x = torch.randn(24, 49, 32) * 3
    with torch.no_grad():
        out = elu(x.clone().requires_grad_(), library=False)
    assert calls == [] and not out.requires_grad
    assert torch.allclose(out, F.elu(x), atol=1e-6)
    elu(x.clone().requires_grad_(), library=False).sum().backward()
    assert calls == [x.shape]
    elu(x.clone().requires_grad_(), library=True).sum().backward()  # torch's own kernel
    assert calls == [x.shape]


def test_the_kernel_is_the_faster_one_timed_once(monkeypatch):
    """The choice is made once per process by timing both, and the module keeps it: a kernel
    made slow is not chosen."""
    from istr_viz.model import activations

    real = activations.F.elu

    def slow_elu(t):
        time.sleep(0.005)
        return real(t)

    activations.library_elu_is_faster.cache_clear()
    try:
        monkeypatch.setattr(activations.F, "elu", slow_elu)
        assert activations.library_elu_is_faster() is False
        assert ELU().library is False
        monkeypatch.setattr(activations.F, "elu", real)
        assert activations.library_elu_is_faster() is False  # cached: not timed again
        activations.library_elu_is_faster.cache_clear()
        real_apply = activations._ELUFunction.apply

        def slow_apply(t):
            time.sleep(0.005)
            return real_apply(t)

        monkeypatch.setattr(activations._ELUFunction, "apply", slow_apply)
        assert activations.library_elu_is_faster() is True
        assert ELU().library is True
    finally:
        activations.library_elu_is_faster.cache_clear()
