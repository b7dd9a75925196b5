"""istr_viz.model.activations: the ELU has torch's values and gradients on either CPU kernel."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from istr_viz.model.activations import ELU, elu


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_values_and_gradients_equal_torch_elu(dtype, atol):
    """The formula (torch's own kernel is the reference)."""
    library = False
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
    """The choice is made once per process by timing both kernels: a kernel made slow is not
    chosen, and a second call times nothing."""
    from istr_viz.model import activations

    real_elu, real_apply = activations.F.elu, activations._ELUFunction.apply
    calls = {"library": 0, "formula": 0}

    def timed(name, fn, slow):
        def run(t):
            calls[name] += 1
            if slow:
                time.sleep(0.005)
            return fn(t)
        return run

    for slow_one, expected in (("library", False), ("formula", True)):
        activations.library_elu_is_faster.cache_clear()
        monkeypatch.setattr(activations.F, "elu", timed("library", real_elu, slow_one == "library"))
        monkeypatch.setattr(activations._ELUFunction, "apply",
                            timed("formula", real_apply, slow_one == "formula"))
        try:
            assert activations.library_elu_is_faster() is expected
            assert calls["library"] > 0 and calls["formula"] > 0
            calls.update(library=0, formula=0)
            assert activations.library_elu_is_faster() is expected  # cached
            assert calls == {"library": 0, "formula": 0}
            module = ELU()
            assert module.library is None  # decided at the first CPU forward
            module(torch.randn(4, 8))
            assert module.library is expected
        finally:
            activations.library_elu_is_faster.cache_clear()


@pytest.mark.parametrize("library", [False, True])
def test_module_keeps_the_kernel_it_was_given_or_first_timed(monkeypatch, library):
    """ELU(library=...) uses that kernel without timing; ELU() takes the timing's answer at its
    first forward and keeps it."""
    from istr_viz.model import activations

    formula_calls = []
    real = activations._ELUFunction.apply
    monkeypatch.setattr(activations._ELUFunction, "apply",
                        lambda t: formula_calls.append(1) or real(t))

    def no_timing():
        raise AssertionError("timed a kernel that was given")

    monkeypatch.setattr(activations, "library_elu_is_faster", no_timing)
    x = torch.randn(8, 16, requires_grad=True)
    out = ELU(library=library)(x)
    out.sum().backward()
    assert torch.allclose(out, F.elu(x), atol=1e-6)
    assert formula_calls == ([] if library else [1])
    monkeypatch.setattr(activations, "library_elu_is_faster", lambda: library)
    module = ELU()
    module(x)
    monkeypatch.setattr(activations, "library_elu_is_faster", lambda: not library)  # not re-read
    formula_calls.clear()
    module(x).sum().backward()
    assert module.library is library and formula_calls == ([] if library else [1])


def test_the_timing_works_under_inference_mode():
    """The first model of a process may be built under ``torch.inference_mode()``."""
    from istr_viz.model import activations

    activations.library_elu_is_faster.cache_clear()
    try:
        with torch.inference_mode():
            assert isinstance(activations.library_elu_is_faster(), bool)
            module = ELU()
            module(torch.randn(4, 8))
            assert isinstance(module.library, bool)
    finally:
        activations.library_elu_is_faster.cache_clear()


def test_other_devices_use_torch_elu_without_timing(monkeypatch):
    from istr_viz.model import activations

    def no_timing():
        raise AssertionError("timed for a tensor that is not on the CPU")

    monkeypatch.setattr(activations, "library_elu_is_faster", no_timing)
    out = elu(torch.empty(4, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 8)


@pytest.mark.parametrize("kernel", ["library", "formula"])
def test_model_elu_pins_the_kernel_of_every_stage_without_timing(monkeypatch, kernel):
    """``model.elu`` = library / formula: every ELU of the built model uses that kernel, and
    nothing is timed, neither when it is built nor when it runs; "auto" leaves the choice to the
    timing, at the first forward."""
    from istr_viz.basis import MaskBasis
    from istr_viz.config import ModelConfig
    from istr_viz.model import activations, build_model

    def no_timing():
        raise AssertionError("timed a pinned kernel")

    rng = np.random.default_rng(0)
    basis = MaskBasis.fit((rng.random((40, 28, 28)) > 0.5).astype(np.float32), dim=4)
    small = dict(backbone="resnet18", backbone_base_channels=8, num_queries=4, num_stages=2,
                 hidden_dim=16, dim_dynamic=4, dim_feedforward=32, num_heads=2, norm="gn")
    monkeypatch.setattr(activations, "library_elu_is_faster", no_timing)
    model = build_model(ModelConfig(**small, elu=kernel), 3, basis).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64), torch.tensor([[64, 64]]))
    flags = [m.library for m in model.modules() if isinstance(m, ELU)]
    assert flags and all(f is (kernel == "library") for f in flags)
    monkeypatch.setattr(activations, "library_elu_is_faster", lambda: kernel == "formula")
    auto = build_model(ModelConfig(**small), 3, basis).eval()
    assert all(m.library is None for m in auto.modules() if isinstance(m, ELU))
    with torch.no_grad():
        auto(torch.rand(1, 3, 64, 64), torch.tensor([[64, 64]]))
    assert all(m.library is (kernel == "formula") for m in auto.modules() if isinstance(m, ELU))


def test_model_elu_rejects_an_unknown_kernel():
    from istr_viz.config import ModelConfig
    from istr_viz.errors import ConfigError

    with pytest.raises(ConfigError, match="model.elu must be auto, library, formula"):
        ModelConfig(elu="fast")
    from istr_viz.model.activations import library_elu_for

    with pytest.raises(ValueError, match="'fast'"):
        library_elu_for("fast")

