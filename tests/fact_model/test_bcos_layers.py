"""B-cos layers against a direct formula (unfold + per-patch norm) and against the ``bcos`` package."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fact_model.bcos import (
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    LogitLayer,
    PositionNormUncentered2d,
    encode_rgb,
    explanation_mode,
)


def reference_bcos_conv(x, weight, stride, padding, dilation, groups, b, max_out):
    """Straight from the definition: every receptive-field patch as a vector (F.unfold)."""
    n, c, h, w = x.shape
    o_total, cg, kh, kw = weight.shape
    patches = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C·kh·kw, L)
    patches = patches.view(n, groups, cg * kh * kw, -1)  # channels of a group are contiguous
    w_hat = weight.reshape(o_total, -1)
    w_hat = w_hat / w_hat.norm(dim=1, keepdim=True)
    w_hat = w_hat.view(groups, o_total // groups, -1)
    lin = torch.einsum("gok,ngkl->ngol", w_hat, patches).reshape(n, o_total, -1)
    norms = (patches.pow(2).sum(dim=2) + 1e-6).sqrt()  # (N, G, L)
    norms = norms.repeat_interleave(o_total // groups, dim=1)
    if max_out > 1:
        lin = lin.view(n, o_total // max_out, max_out, -1)
        # MaxOut picks the unit with the largest linear output; the patch norm is shared.
        lin = lin.max(dim=2).values
        norms = norms.view(n, o_total // max_out, max_out, -1)[:, :, 0]
    if b == 1:
        out = lin
    elif b == 2:
        out = lin.abs() / norms * lin
    else:
        out = ((lin / norms).abs() + 1e-6) ** (b - 1) * lin
    h_out = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    return out.view(n, -1, h_out, out.shape[-1] // h_out)


CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, b, max_out)
    (6, 8, 3, 1, 1, 1, 1, 2, 1),
    (6, 8, 1, 1, 0, 1, 1, 2, 1),
    (8, 12, 3, 2, 1, 1, 2, 2, 1),
    (8, 8, 3, 1, 1, 1, 8, 2, 1),
    (4, 6, 5, 2, 2, 1, 1, 2.5, 1),
    (4, 6, 3, 1, 2, 2, 2, 1.5, 1),
    (6, 4, 3, 1, 0, 1, 1, 1, 1),
    (6, 4, 3, 1, 1, 1, 1, 2, 2),
    (6, 4, 7, 2, 3, 1, 1, 3, 1),
    (6, 8, 2, 2, 0, 1, 2, 2, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv_matches_direct_formula(case):
    cin, cout, k, stride, padding, dilation, groups, b, max_out = case
    torch.manual_seed(0)
    layer = BcosConv2d(cin, cout, k, stride, padding, dilation, groups, b=b, max_out=max_out).double()
    x = torch.randn(2, cin, 11, 13, dtype=torch.double)
    expected = reference_bcos_conv(x, layer.weight, stride, padding, dilation, groups, b, max_out)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-10)


def test_b1_is_a_unit_norm_convolution():
    layer = BcosConv2d(6, 5, 3, padding=1, b=1)
    x = torch.randn(2, 6, 9, 9)
    w_hat = layer.weight / layer.weight.flatten(1).norm(dim=1)[:, None, None, None]
    torch.testing.assert_close(layer(x), F.conv2d(x, w_hat, padding=1))


def test_linear_matches_formula_and_1x1_conv():
    torch.manual_seed(0)
    for b in (1, 2, 2.5):
        linear = BcosLinear(7, 5, b=b).double()
        conv = BcosConv2d(7, 5, 1, b=b).double()
        conv.linear.weight.data.copy_(linear.linear.weight.data[:, :, None, None])
        x = torch.randn(3, 4, 7, dtype=torch.double)
        w_hat = linear.linear.weight / linear.linear.weight.norm(dim=1, keepdim=True)
        lin = x @ w_hat.t()
        norms = (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
        cos = lin / norms
        expected = lin if b == 1 else (cos.abs() * lin if b == 2 else (cos.abs() + 1e-6) ** (b - 1) * lin)
        torch.testing.assert_close(linear(x), expected)
        as_conv = conv(x.permute(0, 2, 1)[..., None])[..., 0].permute(0, 2, 1)
        torch.testing.assert_close(linear(x), as_conv)


def test_norm_layers_match_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4)
    bnu = BatchNormUncentered2d(5)
    bnu.running_var.uniform_(0.5, 2)
    bnu.weight.data.uniform_(0.5, 2)
    bnu.eval()
    expected = bnu.weight[None, :, None, None] * x / (bnu.running_var[None, :, None, None] + 1e-5).sqrt()
    torch.testing.assert_close(bnu(x), expected)
    assert "bias" not in dict(bnu.named_parameters())

    bnu.train()
    var = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(bnu(x), bnu.weight[None, :, None, None] * x / (var[None, :, None, None] + 1e-5).sqrt())

    pnu = PositionNormUncentered2d(5)
    pnu.weight.data.uniform_(0.5, 2)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    torch.testing.assert_close(pnu(x), pnu.weight[None, :, None, None] * x / (var + 1e-5).sqrt())


def test_encoding_and_logit_layer():
    rgb = torch.rand(2, 3, 4, 4)
    six = encode_rgb(rgb)
    assert six.shape == (2, 6, 4, 4)
    torch.testing.assert_close(six[:, 3:], 1 - rgb)
    layer = LogitLayer(logit_temperature=2.0, logit_bias=-math.log(9))
    y = torch.randn(2, 10)
    torch.testing.assert_close(layer(y), y / 2 - math.log(9))
    with pytest.raises(ValueError, match=r"^logit_temperature must be > 0, got 0\.0$"):
        LogitLayer(logit_temperature=0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BcosConv2d(6, 4, 3, padding=1, b=2),
        lambda: BcosConv2d(6, 4, 3, padding=1, groups=2, b=2.5, max_out=2),
        lambda: PositionNormUncentered2d(6),
    ],
)
def test_explanation_mode_keeps_values_and_makes_layer_exactly_linear(make):
    torch.manual_seed(1)
    layer = make().double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.double, requires_grad=True)
    normal = layer(x)
    with explanation_mode(layer):
        detached = layer(x)
        out = detached[0, 1, 3, 2]
        (grad,) = torch.autograd.grad(out, x)
    assert torch.equal(normal, detached)
    # Dynamic linearity: out = W̃(x)·x with W̃ = ∂out/∂x in explanation mode.
    torch.testing.assert_close((grad * x).sum(), out, rtol=1e-10, atol=1e-12)
    # Outside explanation mode the gradient differs (the scale is differentiated too).
    (plain_grad,) = torch.autograd.grad(layer(x)[0, 1, 3, 2], x)
    assert not torch.allclose(plain_grad, grad)


def test_explanation_mode_restores_state_on_error():
    layer = BcosConv2d(6, 4, 3)
    with pytest.raises(RuntimeError), explanation_mode(layer):
        assert layer.detach_dynamic
        raise RuntimeError("boom")
    assert not layer.detach_dynamic


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bias=True), "BcosConv2d has no bias: a bias would break the exact decomposition"),
        (dict(padding_mode="reflect"), "BcosConv2d supports padding_mode='zeros' only, got 'reflect'"),
        (dict(b=0.5), "b must be a real number ≥ 1, got 0.5"),
        (dict(max_out=0), "max_out must be an int ≥ 1, got 0"),
        (dict(groups=4), "in_channels (6) and out_channels (6) must both be divisible by groups (4)"),
    ],
)
def test_conv_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        BcosConv2d(6, 6, 3, **kwargs)
    assert str(info.value) == message


# ----------------------------------------------------------------- parity with the bcos package
bcos_modules = pytest.importorskip("bcos.modules")


@pytest.mark.parametrize("k,stride,groups,b,max_out", list(itertools.product([1, 3], [1, 2], [1, 2], [2, 1.5], [1, 2])))
def test_conv_equals_bcos_package(k, stride, groups, b, max_out):
    cin, cout, padding = 8, 8, k // 2
    torch.manual_seed(0)
    theirs = bcos_modules.BcosConv2d(cin, cout, k, stride, padding, groups=groups, b=b, max_out=max_out).double()
    ours = BcosConv2d(cin, cout, k, stride, padding, groups=groups, b=b, max_out=max_out).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, cin, 9, 9, dtype=torch.double)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-12)


def test_linear_and_norms_equal_bcos_package():
    torch.manual_seed(0)
    theirs = bcos_modules.BcosLinear(7, 5, b=2)
    ours = BcosLinear(7, 5, b=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)  # ε conventions differ by ~1e-12

    norms = bcos_modules.norms
    x = torch.randn(2, 6, 5, 5)
    for their_cls, our_cls in [
        (norms.NoBias(norms.BatchNormUncentered2d), BatchNormUncentered2d),
        (norms.NoBias(norms.PositionNormUncentered2d), PositionNormUncentered2d),
    ]:
        theirs, ours = their_cls(6), our_cls(6)
        for p in theirs.parameters():
            p.data.uniform_(0.5, 2)
        if hasattr(theirs, "running_var"):
            theirs.running_var.uniform_(0.5, 2)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.eval(), ours.eval()
        torch.testing.assert_close(ours(x), theirs(x))
