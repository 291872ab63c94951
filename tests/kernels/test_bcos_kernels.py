"""The B-cos Triton kernels against the PyTorch reference layers (CPU: Triton's interpreter).

conftest.py switches TRITON_INTERPRET on before anything imports Triton, so every
launcher here runs the real kernel code, element by element, on CPU tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fact_model import options
from fact_model.bcos.conv import BcosConv2d
from fact_model.bcos.functional import unit_norm_rows
from fact_model.bcos.linear import BcosLinear
from kernels._common import KernelInputError, interpreting, triton_runs_on
from kernels.bcos_conv import (
    dgrad_geometry,
    dgrad_weight_layout,
    fused_weight_layout,
    launch_explain_dgrad,
    launch_fused_conv,
)
from kernels.bcos_layer import bcos_conv2d, conv_data_grad
from kernels.bcos_postop import (
    ConvGeometry,
    launch_postop,
    launch_postop_backward,
    launch_scale_grad,
    launch_sumsq,
    reference_postop,
    reference_sumsq,
    sumsq_blocks,
)
from kernels.path_table import PathTable

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1"
)

CL = torch.channels_last
# kernel, stride, padding, dilation, groups, B, MaxOut
CASES = [
    (1, 1, 0, 1, 1, 2, 1),
    (1, 2, 0, 1, 1, 2.5, 1),
    (3, 1, 1, 1, 1, 2, 1),
    (3, 2, 1, 1, 2, 2, 2),
    (3, 1, 2, 2, 4, 2.5, 1),
    (7, 2, 3, 1, 1, 2, 1),
    (3, 1, 1, 1, 1, 1, 1),
    (3, 2, 0, 1, 1, 1, 2),
]
N, C, H, W, OUT = 2, 8, 9, 7, 8


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm())


def _geometry(kernel: int, stride: int, padding: int, dilation: int, groups: int) -> ConvGeometry:
    return ConvGeometry(H, W, (kernel, kernel), (stride, stride), (padding, padding), (dilation, dilation), groups)


def _random_conv(kernel, stride, padding, dilation, groups, max_out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g).to(dtype).contiguous(memory_format=CL)
    weight = unit_norm_rows(torch.randn(OUT * max_out, C // groups, kernel, kernel, generator=g)).to(dtype)
    y = F.conv2d(x.float(), weight.float(), None, stride, padding, dilation, groups).to(dtype)
    return x, weight, y.contiguous(memory_format=CL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "k{}s{}p{}d{}g{}B{}m{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_postop_equals_the_reference_layer_maths(case, dtype):
    kernel, stride, padding, dilation, groups, b, max_out = case
    x, _, y = _random_conv(kernel, stride, padding, dilation, groups, max_out, dtype)
    geometry = _geometry(kernel, stride, padding, dilation, groups)
    q = launch_sumsq(x, groups)
    assert torch.allclose(q, reference_sumsq(x, groups), rtol=1e-5)
    out, scale = launch_postop(y, q, geometry, b, max_out, write_scale=True)
    want_out, want_scale = reference_postop(y, x, geometry, b, max_out)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert _rel(out, want_out) <= tolerance
    if b == 1:
        assert scale is None
    else:
        assert _rel(scale, want_scale) <= tolerance


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[4] == 1 and c[6] == 1], ids=lambda c: "k{}s{}p{}d{}B{}".format(*c[:4], c[5])
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["tiles", "map"])
def test_fused_conv_equals_conv_then_reference(case, dtype, norm):
    """Both ways to the patch norm: from the GEMM's input tiles, or the window sum of the Σx² map."""
    kernel, stride, padding, dilation, _, b, _ = case
    x, weight, _ = _random_conv(kernel, stride, padding, dilation, 1, 1, dtype, seed=1)
    geometry = _geometry(kernel, stride, padding, dilation, 1)
    q = launch_sumsq(x) if norm == "map" else None
    out, scale = launch_fused_conv(x, fused_weight_layout(weight), geometry, b, write_scale=True, q=q)
    x32, w32 = x.float(), weight.float()  # the reference sees the same rounded operands
    want_out, want_scale = reference_postop(F.conv2d(x32, w32, None, stride, padding, dilation), x32, geometry, b)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert _rel(out, want_out) <= tolerance
    assert (scale is None) == (b == 1)
    if scale is not None:
        assert _rel(scale, want_scale) <= tolerance


def test_fused_conv_with_tf32_switched_off_uses_full_precision_products(monkeypatch):
    x, weight, _ = _random_conv(3, 1, 1, 1, 1, 1, torch.float32, seed=2)
    geometry = _geometry(3, 1, 1, 1, 1)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    out, _ = launch_fused_conv(x, fused_weight_layout(weight), geometry, 2)
    want, _ = reference_postop(F.conv2d(x, weight, None, 1, 1), x, geometry, 2)
    assert _rel(out, want) <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c[5] != 1], ids=lambda c: "k{}s{}p{}d{}g{}B{}m{}".format(*c))
@pytest.mark.parametrize("path", ["fused", "fused_map", "cudnn"])
@pytest.mark.parametrize("mode", ["training", "explanation"])
def test_layer_forward_and_backward_equal_autograd_of_the_reference(case, path, mode, use_options):
    """Both paths, training backward (through the scale and the norm) and explanation backward (scale constant)."""
    kernel, stride, padding, dilation, groups, b, max_out = case  # (B = 1 layers are plain convolutions, no kernels)
    use_options(bcos_conv_path=path)
    torch.manual_seed(3)
    reference = BcosConv2d(C, OUT, kernel, stride, padding, dilation, groups, b=b, max_out=max_out).double()
    reference.detach_dynamic = mode == "explanation"
    x64 = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    want = reference(x64)
    seed = torch.randn_like(want)
    want_dx, want_dw = torch.autograd.grad(want, (x64, reference.weight), seed)

    x = x64.detach().float().requires_grad_(True)
    weight = reference.weight.detach().float().requires_grad_(True)
    geometry = _geometry(kernel, stride, padding, dilation, groups)
    out = bcos_conv2d(x, unit_norm_rows(weight), geometry, b, max_out, detach_scale=mode == "explanation")
    dx, dw = torch.autograd.grad(out, (x, weight), seed.float())
    assert _rel(out, want) <= 1e-5
    assert _rel(dx, want_dx) <= 1e-5
    assert _rel(dw, want_dw) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 300, 2, 2, 3), (2, 8, 9, 7, 1), (3, 6, 40, 40, 2)], ids=str)
def test_sumsq_blocks_adapt_to_the_shape_and_stay_exact(shape):
    """Few pixels × many channels (late layers) and many pixels × few channels get different blocks."""
    n, c, h, w, groups = shape
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(14)).contiguous(memory_format=CL)
    assert torch.allclose(launch_sumsq(x, groups), reference_sumsq(x, groups), rtol=1e-5)
    assert sumsq_blocks(64 * 7 * 7, 2048, 1, torch.device("cpu"))[1] == 128
    assert sumsq_blocks(4, 300, 1, torch.device("cpu"))[0] == 8  # tiny: the smallest pixel block


# kernel, padding, dilation: "same" and "valid" stride-1 convolutions, dilated, and padding below "same"
DGRAD_CASES = [(1, 0, 1), (3, 1, 1), (3, 0, 1), (5, 1, 1), (7, 3, 1), (3, 2, 2)]


@pytest.mark.parametrize("case", DGRAD_CASES, ids=lambda c: "k{}p{}d{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_explanation_dgrad_equals_the_transposed_convolution(case, dtype):
    """``dx = conv_transpose(g ⊙ scale, ŵ)`` from one kernel, the product taken as the operand loads."""
    kernel, padding, dilation = case
    x, weight, y = _random_conv(kernel, 1, padding, dilation, 1, 1, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    grad = torch.randn(y.shape, generator=g).to(dtype).contiguous(memory_format=CL)
    scale = torch.rand(y.shape, generator=g).to(dtype).contiguous(memory_format=CL)
    geometry = _geometry(kernel, 1, padding, dilation, 1)
    dx = launch_explain_dgrad(grad, scale, dgrad_weight_layout(weight), geometry)
    want = F.conv_transpose2d(
        (grad.double() * scale.double()), weight.double(), None, 1, padding, 0, 1, dilation
    )  # fmt: skip
    assert dx.shape == x.shape and dx.dtype == dtype and dx.is_contiguous(memory_format=CL)
    assert _rel(dx, want) <= (1e-5 if dtype == torch.float32 else 2e-3)


def test_autotuning_skips_tiles_wider_than_the_layer():
    from kernels.bcos_conv import _CONFIGS, fitting_configs

    def shapes(configs):
        return {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs}

    assert shapes(fitting_configs(_CONFIGS, {"O": 2048, "C": 1024})) == shapes(_CONFIGS)
    assert all(n <= 64 for n, _ in shapes(fitting_configs(_CONFIGS, {"O": 64, "C": 1024})))
    assert shapes(fitting_configs(_CONFIGS, {"O": 256, "C": 6})) == {(128, 32)}  # the 6-channel stem: 32-deep steps
    assert fitting_configs(_CONFIGS, {"O": 8, "C": 8})  # never empty


def test_dgrad_geometry_is_a_plain_convolution_for_stride_one_only():
    assert dgrad_geometry(_geometry(3, 1, 1, 1, 1)) == ConvGeometry(H, W, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert dgrad_geometry(_geometry(3, 1, 0, 2, 1)).padding == (4, 4)  # "valid": the gradient pads by d·(k−1)
    assert dgrad_geometry(_geometry(3, 2, 1, 1, 1)) is None  # strided: a fractionally strided convolution
    assert dgrad_geometry(_geometry(3, 1, 1, 1, 2)) is None  # grouped
    assert dgrad_geometry(_geometry(1, 1, 1, 1, 1)) is None  # padding beyond the kernel: negative padding


@pytest.mark.parametrize("case", [(1, 1, 0), (1, 2, 0), (3, 2, 1), (7, 2, 3), (3, 1, 2)], ids=str)
def test_conv_data_grad_keeps_channels_last_and_equals_autograd(case):
    """A 1×1 filter's layout is ambiguous: the data gradient must still come back channels_last."""
    kernel, stride, padding = case
    x, weight, y = _random_conv(kernel, stride, padding, 1, 1, 1, torch.float32, seed=13)
    x.requires_grad_(True)
    grad = torch.randn_like(y).contiguous(memory_format=CL)
    (want,) = torch.autograd.grad(F.conv2d(x, weight, None, stride, padding), x, grad)
    got = conv_data_grad(grad, weight, x.shape, _geometry(kernel, stride, padding, 1, 1))
    assert got.is_contiguous(memory_format=CL)
    assert _rel(got, want) <= 1e-6


def test_layer_caches_its_kernel_weight_layouts_per_weight_version(use_options):
    use_options(kernels="triton")
    layer = BcosConv2d(C, OUT, 3, 1, 1, b=2)
    layer.detach_dynamic = True
    x = torch.randn(N, C, H, W, requires_grad=True)
    torch.autograd.grad(layer(x).sum(), x)
    layouts = layer._weights_cache(x.dtype)
    dgrad = layouts.dgrad
    torch.autograd.grad(layer(x).sum(), x)
    assert layer._weights_cache(x.dtype) is layouts and layouts.dgrad is dgrad  # made once, reused
    with torch.no_grad():
        layer.weight.mul_(-1)  # an in-place update (an optimiser step) bumps the version
    fresh = layer._weights_cache(x.dtype)
    assert fresh is not layouts and torch.equal(fresh.hat, -layouts.hat)


def test_explanation_backward_is_the_dynamic_linear_map():
    """In explanation mode Σ x ⊙ ∂out/∂x = out for every output unit (B-cos is dynamic linear)."""
    torch.manual_seed(4)
    layer = BcosConv2d(C, OUT, 3, 1, 1, b=2)
    x = torch.randn(1, C, H, W, requires_grad=True)
    out = bcos_conv2d(x, unit_norm_rows(layer.weight.detach()), _geometry(3, 1, 1, 1, 1), 2, 1, detach_scale=True)
    for channel, i, j in [(0, 0, 0), (3, 4, 2), (7, 8, 6)]:
        (grad,) = torch.autograd.grad(out[0, channel, i, j], x, retain_graph=True)
        assert torch.allclose((grad * x).sum(), out[0, channel, i, j], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_out", [1, 2])
def test_scale_grad_routes_to_the_maxout_winner(max_out):
    x, _, y = _random_conv(3, 1, 1, 1, 1, max_out, torch.float32, seed=5)
    geometry = _geometry(3, 1, 1, 1, 1)
    _, scale = launch_postop(y, launch_sumsq(x), geometry, 2, max_out, write_scale=True)
    grad = torch.randn_like(scale)
    dy = launch_scale_grad(grad, scale, y, max_out)
    winners = y.unflatten(1, (OUT, max_out)).argmax(dim=2)
    want = torch.zeros_like(y.unflatten(1, (OUT, max_out)))
    want.scatter_(2, winners.unsqueeze(2), (grad * scale).unsqueeze(2))
    assert torch.allclose(dy, want.flatten(1, 2), rtol=1e-6, atol=1e-7)


def test_bcos_linear_on_the_kernels_equals_the_reference(use_options):
    torch.manual_seed(6)
    layer = BcosLinear(12, 5, b=2.5, max_out=2)
    x = torch.randn(3, 4, 12, requires_grad=True)
    use_options(kernels="torch")
    want = layer(x)
    (want_dx,) = torch.autograd.grad(want.square().sum(), x)
    use_options(kernels="triton")
    assert triton_runs_on(x)
    got = layer(x)
    (dx,) = torch.autograd.grad(got.square().sum(), x)
    assert got.shape == want.shape == (3, 4, 5)
    assert _rel(got, want) <= 1e-5 and _rel(dx, want_dx) <= 1e-5


def test_switches():
    x = torch.ones(2, 2)
    with options.using(kernels="torch"):
        assert not triton_runs_on(x)
    with options.using(kernels="auto"):  # auto: CUDA inference only, never the CPU
        assert not triton_runs_on(x)
    with options.using(kernels="triton"):
        assert triton_runs_on(x) and not triton_runs_on(x.double())  # float64 stays on the reference
        with options.using(kernels="torch"):  # blocks nest and restore
            assert not triton_runs_on(x)
        assert triton_runs_on(x)
    with pytest.raises(ValueError, match=r"FACT_KERNELS \(kernels\) must be one of \['auto', 'triton', 'torch'\]"):
        options.Options.from_environ({"FACT_KERNELS": "fast"})
    with pytest.raises(ValueError, match=r"FACT_BCOS_CONV_PATH \(bcos_conv_path\) must be one of .*got 'gpu'"):
        options.Options.from_environ({"FACT_BCOS_CONV_PATH": "gpu"})
    assert options.Options.from_environ({"FACT_KERNELS": " Torch "}).kernels == "torch"


def test_the_environment_is_read_once_per_process():
    """A subprocess reads FACT_* at its first options call; later changes to os.environ do not switch it."""
    code = (
        "import os; from fact_model import options; import kernels._common as c\n"
        "first = c.kernels_mode(); os.environ['FACT_KERNELS'] = 'triton'\n"
        "print(first, c.kernels_mode(), options.current().bcos_conv_path)\n"
    )
    env = {**os.environ, "FACT_KERNELS": "torch", "FACT_BCOS_CONV_PATH": "cudnn"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "torch", "cudnn"]


def test_launchers_refuse_bad_inputs_naming_the_argument():
    x, weight, y = _random_conv(3, 1, 1, 1, 1, 1, torch.float32)
    geometry = _geometry(3, 1, 1, 1, 1)
    q = launch_sumsq(x)
    kc = fused_weight_layout(weight)
    bad = [
        (lambda: launch_sumsq(x.contiguous(), 1), "x must be channels_last"),  # NCHW
        (lambda: launch_sumsq(x.double(), 1), "x has dtype torch.float64"),
        (lambda: launch_sumsq(x.to("meta"), 1), "x is on meta"),
        (lambda: launch_sumsq(x, 3), "groups must be a positive divisor"),
        (lambda: launch_postop(y, launch_sumsq(x[:, :, :4].contiguous(memory_format=CL)), geometry, 2), "q must have"),
        (lambda: launch_postop(y, q.half(), geometry, 2), "q has dtype"),
        (lambda: launch_postop(y, q, geometry, 0.5), "b must be a real number"),
        (lambda: launch_postop(y, q, geometry, 2, max_out=3), "max_out must be a positive divisor"),
        (lambda: launch_postop(y, q, _geometry(3, 2, 1, 1, 1), 2), "y's spatial size"),
        (lambda: launch_fused_conv(x, kc[:-1], geometry, 2), "weight_kc must have"),
        (lambda: launch_fused_conv(x, kc.half(), geometry, 2), "weight_kc has dtype"),
        (lambda: launch_fused_conv(x, kc, _geometry(3, 1, 1, 1, 2), 2), "groups=1 only"),
        (lambda: launch_fused_conv(x, kc, geometry, 1, a_scale=x[:, :4].contiguous(memory_format=CL)), "a_scale has"),
        (lambda: launch_fused_conv(x, kc, geometry, 2, a_scale=x), "B = 1 data-gradient"),
        (lambda: launch_fused_conv(x, kc, geometry, 2, q=q[:1]), "q must have shape"),
        (lambda: launch_fused_conv(x, kc, geometry, 2, q=q.half()), "q has dtype"),
        (lambda: launch_explain_dgrad(y, y, dgrad_weight_layout(weight), _geometry(3, 2, 1, 1, 1)), "cuDNN path"),
        (lambda: launch_explain_dgrad(x[:, :, :4], y, dgrad_weight_layout(weight), geometry), "grad's spatial size"),
        (lambda: launch_scale_grad(y, y[:, :4].contiguous(memory_format=CL)), "scale must have grad's shape"),
        (lambda: launch_postop_backward(y, y, q, geometry, 1), "b = 1 has no dynamic scale"),
    ]
    for call, message in bad:
        with pytest.raises(KernelInputError, match=message):
            call()


def test_ops_are_registered_for_the_compiler():
    """The operators pass PyTorch's schema check (FakeTensor tracing needs compiled kernels: GPU only)."""
    x, _, y = _random_conv(3, 1, 1, 1, 1, 1, torch.float32)
    geometry = [H, W, 3, 3, 1, 1, 1, 1, 1, 1, 1]
    q = torch.ops.fact.bcos_sumsq(x, 1)
    utils = ("test_schema", "test_faketensor") if torch.cuda.is_available() else ("test_schema",)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y, q = x.to(device), y.to(device), q.to(device)
    torch.library.opcheck(torch.ops.fact.bcos_sumsq, (x, 1), test_utils=utils)
    torch.library.opcheck(torch.ops.fact.bcos_postop, (y, q, geometry, 2.0, 1, True), test_utils=utils)
    kc = fused_weight_layout(unit_norm_rows(torch.randn(OUT, C, 3, 3))).to(device)
    torch.library.opcheck(torch.ops.fact.bcos_fused_conv, (x, kc, geometry, 2.0, True), test_utils=utils)
    weight = unit_norm_rows(torch.randn(OUT, C, 3, 3)).to(device)
    grad = torch.randn(N, OUT, H, W, device=device).contiguous(memory_format=CL)
    args = (grad, torch.rand_like(grad), weight, dgrad_weight_layout(weight), None, geometry, [N, C, H, W], 1)
    torch.library.opcheck(torch.ops.fact.bcos_explain_backward, args, test_utils=utils)


@pytest.mark.slow  # a whole model through the interpreted kernels
def test_fact_explanations_with_kernels_on_equal_kernels_off(use_options):
    """The whole model (B-cos and concept-layer kernels) explains as the PyTorch reference does, exactly."""
    from tests.conftest import make_model

    model = make_model([("layer2", 32, 4), ("layer3", 64, 4)])
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    explained = {}
    for mode in ("torch", "triton"):
        use_options(kernels=mode)
        explained[mode] = model.explain(images, top_k=1, maps=True, map_kinds=("concepts",))
    on, off = explained["triton"], explained["torch"]
    assert torch.allclose(on.logits, off.logits, rtol=1e-5, atol=1e-6)
    for layer in off.layer_names:
        assert _rel(on.contributions[layer], off.contributions[layer]) <= 1e-5
    relative_residual = (on.residual.abs() / on.explained.abs().clamp_min(1e-6)).max()
    assert relative_residual <= 1e-4
    got_maps, want_maps = on.maps.concepts, off.maps.concepts
    for layer in want_maps:
        assert _rel(got_maps[layer], want_maps[layer]) <= 1e-4


@pytest.mark.parametrize("case", [(3, 1, 1), (3, 2, 1)], ids=["stride1-fused", "stride2-cudnn"])
def test_vmapped_explanation_backward_equals_one_backward_per_cotangent(case, use_options):
    """``vmap`` over the layer's explanation backward (input and filter gradients) = a loop over cotangents."""
    kernel, stride, padding = case
    use_options(bcos_conv_path="auto")
    x, weight, _ = _random_conv(kernel, stride, padding, 1, 1, 1, torch.float32, seed=15)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = bcos_conv2d(x, weight, _geometry(kernel, stride, padding, 1, 1), 2, 1, detach_scale=True)
    seeds = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(16))

    def vjp(seed):
        return torch.autograd.grad(out, (x, weight), seed, retain_graph=True)

    batched = torch.func.vmap(vjp)(seeds)
    looped = [torch.stack(g) for g in zip(*(vjp(seed) for seed in seeds), strict=True)]
    for got, want in zip(batched, looped, strict=True):
        assert _rel(got, want) <= 1e-6


@pytest.mark.slow  # a whole model through the interpreted kernels
def test_batched_vjp_on_the_kernels_folds_the_ranks_into_one_launch(use_options, monkeypatch):
    """Rank passes as one vmapped backward: each B-cos backward runs once on R·N cotangents, not R times."""
    import warnings

    import kernels.bcos_layer as bcos_layer
    from tests.conftest import make_model

    model = make_model([("layer2", 32, 4), ("layer3", 64, 4)])
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    kwargs = {"top_k": 2, "maps": True, "map_kinds": ("concepts",), "map_layers": ["layer3"]}
    use_options(kernels="torch")
    want = model.explain(images, **kwargs, batched_vjp=False)
    use_options(kernels="triton")
    calls: dict[bool, list[int]] = {False: [], True: []}
    got = {}
    original = bcos_layer.explain_data_grad
    for batched in (False, True):

        def counting(grad, *args, _seen=calls[batched], **kw):  # type: ignore[no-untyped-def]
            _seen.append(grad.shape[0])
            return original(grad, *args, **kw)

        monkeypatch.setattr(bcos_layer, "explain_data_grad", counting)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a per-sample vmap fallback ("performance drop") warns
            got[batched] = model.explain(images, **kwargs, batched_vjp=batched)
    per_rank = calls[True].count(2)  # the B-cos backwards of the rank passes, batched (R·N = 2·1)
    assert per_rank > 0 and set(calls[False]) == {1}
    assert len(calls[False]) == len(calls[True]) + per_rank  # each batched call replaced R = 2 looped ones
    for layer in want.maps.concepts:
        assert _rel(got[True].maps.concepts[layer], want.maps.concepts[layer]) <= 1e-4
        assert _rel(got[True].maps.concepts[layer], got[False].maps.concepts[layer]) <= 1e-5
    assert _rel(got[True].traces[0].contributions, want.traces[0].contributions) <= 1e-4


def test_path_table_keeps_the_faster_path_per_key_and_measures_once():
    costs = {"fused": 2.0, "cudnn": 1.0}
    calls = []

    def timer(run):
        calls.append(run())
        return costs[calls[-1]]

    table = PathTable(timer=timer)
    candidates = {name: (lambda name=name: name) for name in costs}
    assert table.choose(("a",), candidates) == "cudnn"
    costs["fused"] = 0.5  # the table answers from memory: no new measurement for a known key
    assert table.choose(("a",), candidates) == "cudnn" and len(calls) == 2
    assert table.choose(("b",), candidates) == "fused" and table.timings_ms[("b",)] == {"fused": 0.5, "cudnn": 1.0}
    table.clear()
    assert table.choose(("a",), candidates) == "fused" and len(calls) == 6
