"""Strided 1×1 convolutions on the CPU avoid oneDNN's broken weight-gradient kernel.

PyTorch 2.14.1 (oneDNN 3.12) computes the weight gradient of a 1×1 convolution with
stride > 1 on a channels_last float32 input with 1–7 input channels with a kernel that
corrupts the heap (SIGSEGV/abort with one thread), hangs, or silently returns a wrong
gradient (two threads) on CPUs without AVX-512. ``ONEDNN_MAX_CPU_ISA=AVX2`` makes an
AVX-512 machine pick that kernel too. :class:`NormedConv2d` runs such a convolution as
a stride-1 1×1 convolution of the subsampled input, which these tests check is the same
function with the same gradients, and that it survives the capped ISA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fact_model.bcos.conv import BcosConv2d, NormedConv2d, runs_as_subsampled_pointwise
from fact_model.bcos.functional import unit_norm_rows

SUBPROCESS_TIMEOUT_S = 240
"""Generous for 2 shared cores; a hang of the broken kernel never returns at all."""


def _layer_and_input(
    stride: tuple[int, int], size: tuple[int, int], channels_last: bool, seed: int = 0
) -> tuple[NormedConv2d, torch.Tensor]:
    """A float64 ``NormedConv2d(4 → 8, 1×1, stride)`` and an input ``(3, 4, *size)``."""
    torch.manual_seed(seed)
    layer = NormedConv2d(4, 8, 1, stride=stride, bias=False).double()
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return layer, x.requires_grad_(True)


@pytest.mark.parametrize("stride", [(2, 2), (3, 3), (2, 1), (4, 3)])
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_subsampled_pointwise_conv_equals_the_strided_conv(stride, size, channels_last):
    layer, x = _layer_and_input(stride, size, channels_last)
    assert runs_as_subsampled_pointwise(layer, x)
    out = layer(x)
    cotangent = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad(out, (x, layer.weight), cotangent)

    # Reference: the plain strided conv (float64 never takes the broken kernel).
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    out_ref = F.conv2d(x_ref, unit_norm_rows(w_ref), stride=stride)
    ref_x, ref_w = torch.autograd.grad(out_ref, (x_ref, w_ref), cotangent)

    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-12, atol=1e-12)
    # Positions the stride skips get no input gradient; the others do.
    skipped = torch.ones_like(grad_x, dtype=torch.bool)
    skipped[..., :: stride[0], :: stride[1]] = False
    assert (grad_x[skipped] == 0).all() and (grad_x[~skipped] != 0).any()


def test_the_workaround_keeps_channels_last():
    layer, x = _layer_and_input((2, 2), (8, 8), channels_last=True)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kernel_size=1, stride=1), dict(kernel_size=3, stride=2), dict(kernel_size=1, stride=2, padding=1)],
)
def test_other_convolutions_run_unchanged(kwargs):
    layer = NormedConv2d(4, 8, bias=False, **kwargs)
    assert not runs_as_subsampled_pointwise(layer, torch.zeros(1, 4, 8, 8))


def test_bcos_conv_uses_the_workaround_in_float32():
    torch.manual_seed(0)
    conv = BcosConv2d(4, 8, kernel_size=1, stride=2)
    x = torch.rand(2, 4, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = conv.weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    # Independent float64 reference: B=2 unit on each subsampled pixel, as an einsum.
    sub = x64[..., ::2, ::2]
    linear = torch.einsum("oc,nchw->nohw", unit_norm_rows(w).flatten(1), sub)
    norms = (sub.square().sum(dim=1, keepdim=True) + 1e-6).sqrt()
    reference = linear.abs() / norms * linear
    out = conv(x)
    cotangent = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad(out, (x, conv.weight), cotangent)
    ref_x, ref_w = torch.autograd.grad(reference, (x64, w), cotangent.double())
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x.double(), ref_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-4, atol=1e-5)


LAYER_SCRIPT = """
import copy
import torch
from fact_model.bcos.conv import BcosConv2d, NormedConv2d

torch.manual_seed(0)
x = torch.rand(32, 4, 32, 32).contiguous(memory_format=torch.channels_last)
for layer in (NormedConv2d(4, 8, 1, stride=2, bias=False), BcosConv2d(4, 8, kernel_size=1, stride=2)):
    reference = copy.deepcopy(layer).double()
    layer(x.requires_grad_(True)).square().sum().backward()
    reference(x.detach().double()).square().sum().backward()  # float64: never the broken kernel
    grad, ref = layer.weight.grad.double(), reference.weight.grad
    error = ((grad - ref).abs().max() / ref.abs().max()).item()
    assert error < 1e-4, f"{type(layer).__name__}: weight gradient off by {error:.2e} (relative)"
    x = x.detach()
print("layers ok")
"""

TRAINING_SCRIPT = """
import torch
import torch.nn.functional as F
from fact_model.config import FaCTConfig, Preprocessing
from fact_model.bcos.encoding import encode_rgb
from fact_model.model import FaCTModel

torch.manual_seed(0)
config = FaCTConfig(
    backbone="bcos_resnet8",
    backbone_kwargs={"width": 4},
    class_names=[str(i) for i in range(10)],
    preprocessing=Preprocessing(32),
    output_activation="sigmoid",
)
model = FaCTModel(config).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
images, labels = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
for _ in range(2):
    logits = model.forward_encoded(encode_rgb(images)).logits
    loss = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 10).float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
print("training ok")
"""


def _run_with_avx2_onednn(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter with oneDNN capped to AVX2 and one OpenMP thread."""
    env = {
        **os.environ,
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "DNNL_MAX_CPU_ISA": "AVX2",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {SUBPROCESS_TIMEOUT_S} s under ONEDNN_MAX_CPU_ISA=AVX2 (the oneDNN bug)")


def _assert_survived(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 0, (
        f"exit status {result.returncode} under ONEDNN_MAX_CPU_ISA=AVX2 "
        f"(negative/134/139: crashed in oneDNN)\n{result.stdout}\n{result.stderr[-3000:]}"
    )
    assert expected in result.stdout


@pytest.mark.slow  # a subprocess with oneDNN's AVX2 path
def test_strided_pointwise_layers_survive_avx2_onednn():
    _assert_survived(_run_with_avx2_onednn(LAYER_SCRIPT), "layers ok")


@pytest.mark.slow  # training steps in a subprocess
def test_tiny_backbone_training_steps_survive_avx2_onednn():
    _assert_survived(_run_with_avx2_onednn(TRAINING_SCRIPT), "training ok")
