"""B-cos ViT-c backbones: parity with ``bcos``'s own models, and every explanation identity on a ViT FaCT model.

The references are independent of the decomposition in :mod:`fact_model.explain`: bcos's
own networks, a float64 copy of the model, and plain autograd in explanation mode (the
positional embedding taken from bcos's module through a forward hook).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

import fact_model
from fact_model import explain as explain_module
from fact_model.backbones import create_backbone, list_backbones, load_bcos_v2_checkpoint
from fact_model.backbones.vit import BcosViTBackbone
from fact_model.bcos.encoding import encode_rgb
from tests._support.exactness import (
    REL_TOL,
    assert_sums_to,
    autograd_contributions,
    check_completeness_for_every_class,
    check_contrastive_completeness,
    reference_scores,
)
from tests.conftest import make_model, randomise_norm_statistics

bcos_vit = pytest.importorskip("bcos.models.vit")
from bcos.models import pretrained as bcos_pretrained  # noqa: E402
from bcos.modules import BcosConv2d, BcosLinear, BcosSequential, DetachableGNLayerNorm2d, LogitLayer, norms  # noqa: E402
from bcos.modules.common import DetachableModule  # noqa: E402

VIT = "bcos_vitc"  # default: dim 64, 4 blocks, stem (16, 32, 64): a 32 px image is a 4 × 4 token grid
LAST = [("transformer.encoder_3", 48, 4)]
MIDDLE = [("transformer.encoder_1", 32, 4)]
TWO = [("transformer.encoder_1", 32, 4), ("transformer.encoder_3", 48, 4)]


def vit_model(layers, seed: int = 0, **kwargs) -> fact_model.FaCTModel:
    return make_model(layers, backbone=VIT, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def vit_images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------- backbones
def test_registry_has_the_vits_and_validates_arguments():
    names = list_backbones()
    for name in ("bcos_vitc", "bcos_v2_vitc_ti_patch1_14", "bcos_v2_vitc_s_patch1_14", "bcos_v2_vitc_b_patch1_14"):
        assert name in names
    for kwargs, message in [
        ({"dim": 30}, "multiple of 4"),
        ({"dim": 4}, "≥ 8"),
        ({"heads": 3}, "dividing dim=64"),
        ({"depth": 0}, "depth"),
        ({"conv_stem": []}, "conv_stem"),
        ({"b": 0.5}, "b must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            create_backbone(VIT, **kwargs)


def _their_vit(make_vit, num_classes: int, logit_bias: float, **structure) -> BcosSequential:
    """A B-cos ViT as bcos's ``vit_final`` configuration builds it (model + LogitLayer in a BcosSequential)."""
    layers = dict(
        linear_layer=partial(BcosLinear, b=2, max_out=1),
        conv2d_layer=partial(BcosConv2d, b=2, max_out=1),
        norm_layer=norms.NoBias(norms.DetachableLayerNorm),
        norm2d_layer=norms.NoBias(DetachableGNLayerNorm2d),
        act_layer=nn.Identity,
        channels=6,
    )
    with pytest.warns(UserWarning, match="entrypoints"):  # bcos warns: it wants its pretrained module
        vit = make_vit(num_classes=num_classes, **layers, **structure)
    return BcosSequential(vit, LogitLayer(logit_bias=logit_bias))


def _check_parity(theirs: nn.Module, ours: BcosViTBackbone, x6: torch.Tensor) -> None:
    with torch.no_grad():
        expected = theirs(x6)
        bias = theirs[1].logit_bias
        got = ours(x6)
        scale = (expected - bias).abs().max()
        assert (got - expected).abs().max() <= 1e-5 * scale, f"{(got - expected).abs().max():.3e} vs {scale:.3e}"
        assert (ours.net(x6) - theirs[0](x6)).abs().max() <= 1e-5 * scale  # net alone: bcos's ViT


def test_imagenet_vit_equals_bcos_package_and_loads_its_checkpoint(tmp_path):
    """bcos's own ViT-c Ti (its ``pretrained`` entrypoint, random weights) → its state dict file → ours, strict."""
    torch.manual_seed(0)
    theirs = bcos_pretrained.vitc_ti_patch1_14(pretrained=False, num_classes=12)
    randomise_norm_statistics(theirs, torch.Generator().manual_seed(0))
    theirs.eval()
    assert all(key.startswith("0.") for key in theirs.state_dict())  # BcosSequential(vit, LogitLayer)
    checkpoint = tmp_path / "bcos_vitc_ti_patch1_14.pth"
    torch.save(theirs.state_dict(), checkpoint)

    ours = create_backbone("bcos_v2_vitc_ti_patch1_14", num_classes=12, logit_bias=theirs[1].logit_bias)
    load_bcos_v2_checkpoint(ours, checkpoint)  # strict=True inside
    ours.eval()
    x6 = encode_rgb(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))  # a 4 × 4 token grid
    _check_parity(theirs, ours, x6)
    assert ours.stage_names[-1] == "transformer.encoder_10" and len(ours.stage_names) == 12


@pytest.mark.slow  # a full-size ViT-C-S at 224 px
def test_real_vitc_s_at_224_px_builds_runs_and_equals_bcos():
    """The paper's ViT-c S at its resolution (14 × 14 tokens): one forward each, weights shared in memory."""
    torch.manual_seed(0)
    ours = create_backbone("bcos_v2_vitc_s_patch1_14").eval()
    theirs = bcos_pretrained.vitc_s_patch1_14(pretrained=False).eval()
    theirs[0].load_state_dict(ours.net.state_dict(), strict=True)
    assert theirs[1].logit_bias == pytest.approx(ours.logit_layer.bias)  # both -log(999)
    x6 = encode_rgb(torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        grid = ours.stages[0][1](x6)
    assert grid.shape == (1, 384, 14, 14) and ours.stage_channels("transformer.encoder_7") == 384
    _check_parity(theirs, ours, x6)


def test_small_vit_equals_bcos_simple_vit_and_loads_unprefixed_weights(tmp_path):
    structure = dict(image_size=14, patch_size=1, dim=32, depth=3, heads=2, mlp_dim=48, conv_stem=[8, 16])
    torch.manual_seed(0)
    theirs = _their_vit(bcos_vit.SimpleViT, num_classes=7, logit_bias=-1.5, **structure).eval()
    randomise_norm_statistics(theirs, torch.Generator().manual_seed(2))
    ours = create_backbone(VIT, num_classes=7, dim=32, depth=3, heads=2, mlp_dim=48, conv_stem=[8, 16], logit_bias=-1.5)
    prefixed, plain = tmp_path / "prefixed.pth", tmp_path / "plain.safetensors"
    torch.save(theirs.state_dict(), prefixed)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in theirs[0].state_dict().items()}, str(plain))  # SimpleViT alone
    x6 = encode_rgb(torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(3)))  # any size: a 6 × 10 grid
    for checkpoint in (prefixed, plain):
        load_bcos_v2_checkpoint(ours, checkpoint)
        _check_parity(theirs, ours.eval(), x6)
    torch.save({**theirs.state_dict(), "0.extra": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match architecture bcos_vitc"):
        load_bcos_v2_checkpoint(ours, tmp_path / "bad.pth")


def test_stages_are_token_grids_that_reproduce_the_network():
    torch.manual_seed(0)
    backbone = create_backbone(VIT, num_classes=5).eval()
    randomise_norm_statistics(backbone, torch.Generator().manual_seed(1))
    x6 = encode_rgb(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        h = x6
        for name, stage in backbone.stages:
            h = stage(h)
            assert h.shape == (2, backbone.stage_channels(name), 4, 4)
        torch.testing.assert_close(backbone.forward_head(h), backbone(x6), rtol=0, atol=0)
        # Token i·w + j of bcos's sequence is grid position (i, j): compare with bcos's own first block.
        net = backbone.net
        patches = net.to_patch_embedding(x6)
        tokens = patches.flatten(1, 2) + net.positional_embedding(patches)
        after_block = net.transformer[0](tokens)
        grid = backbone.stages[1][1](backbone.stages[0][1](x6))
        torch.testing.assert_close(grid[:, :, 1, 2], after_block[:, 1 * 4 + 2], rtol=1e-6, atol=1e-6)
    assert backbone.stage_names == ("to_patch_embedding", *(f"transformer.encoder_{i}" for i in range(4)))
    assert all(key.startswith("net.") for key in backbone.state_dict())  # adapters and switch add no keys
    assert len(backbone.state_dict()) == len(net.state_dict())


def test_explanation_mode_switches_bcos_modules_and_changes_no_forward_value(vit_images):
    model = vit_model(TWO)
    bcos_modules = [m for m in model.modules() if isinstance(m, DetachableModule)]
    assert any(type(m).__name__ == "Attention" for m in bcos_modules)
    with torch.no_grad():
        plain = model(vit_images)
        with model.explanation_mode():
            assert all(m.detach for m in bcos_modules)
            detached = model(vit_images)
    assert not any(m.detach for m in bcos_modules)
    torch.testing.assert_close(detached, plain, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- completeness
def token_magnitude(model, images, classes) -> torch.Tensor:
    """``Σ_p |F_p · ∂y_c/∂F_p|`` over the final tokens by autograd: the size of the terms the head adds up."""
    with model.explanation_mode():
        record = model.forward_encoded(encode_rgb(images))
        features = record.head_input
        y = record.scores.gather(1, classes[:, None]).sum()
        (grad,) = torch.autograd.grad(y, features)
    return (features * grad).sum(dim=1).abs().flatten(1).sum(1).detach()


@pytest.mark.parametrize("layers", [LAST, MIDDLE, TWO], ids=["last", "middle", "two"])
def test_completeness_for_every_class(layers, vit_images):
    model = vit_model(layers)
    assert explain_module.closed_form_applies(model) == (layers is not MIDDLE)
    magnitude = lambda target: token_magnitude(model, vit_images, target)  # noqa: E731
    for expl in check_completeness_for_every_class(model, vit_images, magnitude, 1e-7):
        assert all(expl.spatial[name].shape[2:] == (4, 4) for name in expl.layer_names)  # the token grid


@pytest.mark.parametrize("kwargs", [{}, {"b": 2.5, "logit_temperature": 0.7}, {"b": 1}], ids=["B2", "B2.5-T0.7", "B1"])
def test_closed_form_of_the_vit_head_equals_autograd(kwargs, vit_images):
    model = vit_model(LAST, **kwargs)
    assert explain_module.closed_form_applies(model)
    for target in (None, 3):
        expl = model.explain(vit_images, target=target)
        reference = autograd_contributions(model, vit_images, expl.target, "transformer.encoder_3")
        assert (expl.contributions["transformer.encoder_3"] - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_head_without_closed_form_uses_one_backward_and_stays_exact(vit_images, monkeypatch):
    model = vit_model(LAST, max_out=2)
    assert not model.backbone.head_has_closed_form and not explain_module.closed_form_applies(model)
    monkeypatch.setattr(explain_module, "closed_form_code_gradient", None)  # would raise if it were used
    expl = model.explain(vit_images, target=1)
    reference = autograd_contributions(model, vit_images, expl.target, "transformer.encoder_3")
    assert (expl.contributions["transformer.encoder_3"] - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert_sums_to(expl.contributions["transformer.encoder_3"], reference_scores(model, vit_images)[:, 1])


def test_middle_layer_matches_autograd(vit_images):
    model = vit_model(MIDDLE)
    expl = model.explain(vit_images, target=2)
    reference = autograd_contributions(model, vit_images, expl.target, "transformer.encoder_1")
    assert (expl.contributions["transformer.encoder_1"] - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("layers", [LAST, TWO], ids=["last", "two"])
def test_contrast_decomposes_the_difference(layers, vit_images):
    model = vit_model(layers)
    check_contrastive_completeness(
        model, vit_images, lambda t, c: token_magnitude(model, vit_images, t) + token_magnitude(model, vit_images, c)
    )


# ---------------------------------------------------------------------------- input maps
def autograd_input_parts(model, images, quantity):
    """``(a, Σ x ⊙ ∂a/∂x, Σ pe ⊙ ∂a/∂tokens)`` by plain autograd in explanation mode.

    The tokens are bcos's patch embedding's output (caught with a forward hook), the
    embedding ``pe`` bcos's ``PosEmbSinCos2d`` of them; ``quantity(record) → (N,)``.
    """
    net = model.backbone.net
    caught = []
    handle = net.to_patch_embedding.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        x6 = encode_rgb(images).requires_grad_(True)
        with model.explanation_mode():
            record = model.forward_encoded(x6)
            a = quantity(record)
            patches = caught[0]  # (N, h, w, D): tokens before the embedding is added
            grad_x, grad_tokens = torch.autograd.grad(a.sum(), (x6, patches))
    finally:
        handle.remove()
    pe = net.positional_embedding(patches).view_as(patches[0])  # (h, w, D)
    return a.detach(), (x6 * grad_x).sum((1, 2, 3)).detach(), (pe * grad_tokens).sum((1, 2, 3)).detach()


def test_whole_vit_is_dynamic_linear_up_to_the_positional_embedding(vit_images):
    """Without explain(): a = Σ x ⊙ ∂a/∂x + Σ pe ⊙ ∂a/∂tokens, for a logit and a concept activation."""
    model = vit_model(TWO)
    for quantity in (lambda r: r.scores[:, 3], lambda r: r.codes["transformer.encoder_1"].totals().amax(dim=1)):
        a, pixels, positional = autograd_input_parts(model, vit_images, quantity)
        torch.testing.assert_close(pixels + positional, a, rtol=REL_TOL, atol=1e-6)
        assert (positional.abs() > 1e-3 * a.abs()).any()  # the embedding's share is real: ignoring it would fail


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_input_maps_plus_positional_share_are_exact(batched, vit_images):
    model = vit_model(TWO)
    expl = model.explain(vit_images, target=1, top_k=3, maps=True, batched_vjp=batched)
    maps, positional = expl.maps, expl.maps.positional
    assert maps.inputs.shape == (4, 6, 32, 32) and positional is not None
    for name in expl.layer_names:
        assert maps.concepts[name].shape == (4, 3, 6, 32, 32) and positional.concepts[name].shape == (4, 3)
        pixel_sums = maps.pixel_contributions(maps.concepts[name]).flatten(2).sum(-1)
        activation = expl.activations[name].gather(1, expl.top_ids[name])
        torch.testing.assert_close(pixel_sums + positional.concepts[name], activation, rtol=REL_TOL, atol=1e-5)
        for r in range(3):  # against autograd of the plain model, concept by concept
            ids = expl.top_ids[name][:, r : r + 1]
            _, pixels, pe_share = autograd_input_parts(
                model, vit_images, lambda rec, ids=ids, name=name: rec.codes[name].totals().gather(1, ids)[:, 0]
            )
            torch.testing.assert_close(pixel_sums[:, r], pixels, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(positional.concepts[name][:, r], pe_share, rtol=1e-4, atol=1e-5)
    logit_pixels = maps.pixel_contributions(maps.logit).sum((-1, -2))
    torch.testing.assert_close(logit_pixels + positional.logit, expl.explained, rtol=REL_TOL, atol=1e-6)
    _, pixels, pe_share = autograd_input_parts(model, vit_images, lambda rec: rec.scores[:, 1])
    torch.testing.assert_close(positional.logit, pe_share, rtol=1e-4, atol=1e-6)
    other_pixels = maps.pixel_contributions(maps.other).sum((-1, -2))
    torch.testing.assert_close(
        other_pixels + positional.other, expl.other_contribution["transformer.encoder_3"], rtol=REL_TOL, atol=1e-6
    )


def test_concept_layer_on_the_patch_embedding_and_concept_input_maps(vit_images):
    """The first stage is a valid position too (its features are the tokens the share is taken on)."""
    model = vit_model([("to_patch_embedding", 24, 4), ("transformer.encoder_2", 32, 4)])
    expl = model.explain(vit_images, top_k=2, maps=True)
    name = "to_patch_embedding"
    pixel_sums = expl.maps.pixel_contributions(expl.maps.concepts[name]).flatten(2).sum(-1)
    activation = expl.activations[name].gather(1, expl.top_ids[name])
    torch.testing.assert_close(pixel_sums + expl.maps.positional.concepts[name], activation, rtol=REL_TOL, atol=1e-5)
    maps, x6, positional = explain_module.concept_input_maps(
        model, vit_images, name, expl.top_ids[name], return_positional=True
    )
    torch.testing.assert_close(maps, expl.maps.concepts[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(positional, expl.maps.positional.concepts[name], rtol=1e-5, atol=1e-6)
    assert len(explain_module.concept_input_maps(model, vit_images, name, expl.top_ids[name])) == 2


def test_cnn_maps_have_no_positional_share(images):
    expl = make_model([("layer3", 16, 4)]).explain(images, top_k=2, maps=True)
    assert expl.maps.positional is None


# ---------------------------------------------------------------------------- traces, spatial maps
def test_cross_layer_traces_equal_autograd_and_sum_to_upper_activation(vit_images):
    model = vit_model(TWO)
    expl = model.explain(vit_images, top_k=3)
    (trace,) = expl.traces
    assert (trace.upper, trace.lower) == ("transformer.encoder_3", "transformer.encoder_1")
    assert trace.contributions.shape == (4, 3, 32)
    assert_sums_to(trace.contributions, expl.activations[trace.upper].gather(1, trace.upper_ids))
    with model.explanation_mode():  # reference: dense autograd from the upper total to the lower codes
        record = model.forward_encoded(encode_rgb(vit_images))
        lower, upper = record.codes[trace.lower], record.codes[trace.upper]
        for r in range(3):
            total = upper.totals().gather(1, trace.upper_ids[:, r : r + 1]).sum()
            (grad,) = torch.autograd.grad(total, lower.values, retain_graph=True)
            reference = lower.scatter((lower.values * grad).detach())
            scale = reference.abs().max()
            assert (trace.contributions[:, r] - reference).abs().max() <= 1e-5 * scale


def test_spatial_maps_are_token_grids_that_sum_to_contributions(vit_images):
    model = vit_model(TWO)
    expl = model.explain(vit_images, top_k=3)
    for name in expl.layer_names:
        assert expl.spatial[name].shape == (4, 3, 4, 4)
        torch.testing.assert_close(
            expl.spatial[name].flatten(2).sum(-1),
            expl.contributions[name].gather(1, expl.top_ids[name]),
            rtol=1e-5,
            atol=1e-8,
        )


def test_batch_images_are_independent_and_explain_restores_modes(vit_images):
    model = vit_model(TWO).train()
    before = vit_images.clone()
    batch = model.explain(vit_images, target=2, maps=True, top_k=2)
    assert torch.equal(vit_images, before) and model.training
    assert not any(getattr(m, "detach", False) for m in model.modules() if isinstance(m, DetachableModule))
    model.eval()
    for n in range(vit_images.shape[0]):
        single = model.explain(vit_images[n : n + 1], target=2)
        torch.testing.assert_close(
            single.contributions["transformer.encoder_3"][0],
            batch.contributions["transformer.encoder_3"][n],
            rtol=1e-5,
            atol=1e-7,
        )


# ---------------------------------------------------------------------------- artifacts, ONNX
def test_vit_artifact_round_trips(tmp_path, vit_images):
    model = vit_model(TWO)
    directory = fact_model.save(model, tmp_path / "vit")
    loaded = fact_model.load(directory)
    assert loaded.manifest["model"]["backbone"] == VIT and loaded.manifest["B"] == 2
    assert isinstance(loaded.backbone, BcosViTBackbone)
    with torch.no_grad():
        assert torch.equal(loaded(vit_images), model(vit_images))
    a, b = model.explain(vit_images, top_k=2, maps=True), loaded.explain(vit_images, top_k=2, maps=True)
    torch.testing.assert_close(b.contributions["transformer.encoder_1"], a.contributions["transformer.encoder_1"])
    torch.testing.assert_close(b.maps.positional.logit, a.maps.positional.logit)


@pytest.mark.slow  # an ONNX export and runtime session
def test_vit_exports_to_onnx_and_matches_explain(tmp_path, vit_images):
    pytest.importorskip("onnxruntime")
    from fact_model.onnx_export import export_onnx
    from fact_model.onnx_runtime import OnnxPredictor

    model = vit_model([("transformer.encoder_1", 48, 4)], depth=2)  # two blocks: a smaller graph to export
    directory = fact_model.save(model, tmp_path / "vit")
    entry = export_onnx(directory, top_k=3)
    assert entry["layer"] == "transformer.encoder_1"
    outputs = OnnxPredictor(directory, device="cpu").run(vit_images)
    expl = model.explain(vit_images, top_k=3)
    torch.testing.assert_close(torch.from_numpy(outputs["logits"]), expl.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.from_numpy(outputs["predicted"]), expl.target)
    assert torch.equal(torch.from_numpy(outputs["top_ids"]), expl.top_ids["transformer.encoder_1"])
    contributions = expl.contributions["transformer.encoder_1"].gather(1, expl.top_ids["transformer.encoder_1"])
    torch.testing.assert_close(torch.from_numpy(outputs["top_contributions"]), contributions, rtol=1e-4, atol=1e-6)
    assert (torch.from_numpy(outputs["residual"]) <= REL_TOL * expl.explained.abs()).all()


def test_vit_without_closed_form_is_refused_by_the_onnx_export():
    from fact_model.onnx_export import PredictionGraph

    with pytest.raises(ValueError, match="closed-form.*'transformer.encoder_3'"):
        PredictionGraph(vit_model(MIDDLE), 5)


def test_deep_copy_of_a_vit_model_is_independent(vit_images):
    model = vit_model(LAST)
    clone = copy.deepcopy(model)
    assert clone.backbone.stages[1][1].block is clone.backbone.net.transformer[0]  # adapters follow the copy
    with torch.no_grad():
        clone.backbone.net.linear_head.norm.weight.mul_(2)
        assert not torch.equal(clone(vit_images), model(vit_images))
    with clone.explanation_mode():
        assert clone.backbone.net.transformer[0].attn.detach and not model.backbone.net.transformer[0].attn.detach


# ---------------------------------------------------------------------------- positions, paper sizes
@pytest.mark.parametrize("stage", ["to_patch_embedding", *(f"transformer.encoder_{i}" for i in range(4))])
def test_every_stage_is_a_concept_layer_position(stage, vit_images):
    model = vit_model([(stage, 16, 4)])
    expl = model.explain(vit_images[:2], top_k=2)
    expected = reference_scores(model, vit_images[:2]).gather(1, expl.target[:, None]).squeeze(1)
    magnitude = torch.maximum(expected.abs(), 1e-2 * token_magnitude(model, vit_images[:2], expl.target))
    assert_sums_to(expl.contributions[stage], expected, magnitude)
    assert expl.spatial[stage].shape == (2, 2, 4, 4)


def test_paper_placement_on_vitc_s():
    """ViT-c S at 224 px with the paper's sizes: blocks 4 (K 8,192, k 32) and 10 (K 16,384, k 64)."""
    layers = [("transformer.encoder_4", 8192, 32), ("transformer.encoder_10", 16384, 64)]
    model = make_model(layers, backbone="bcos_v2_vitc_s_patch1_14")
    assert explain_module.closed_form_applies(model)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expl = model.explain(image, top_k=2)
    with torch.no_grad():  # the plain forward pass (a float64 copy of this model would cost more than the test)
        expected = (model(image) - model.logit_bias).gather(1, expl.target[:, None]).squeeze(1)
    magnitude = torch.maximum(expected.abs(), 1e-2 * token_magnitude(model, image, expl.target))
    for name, _, _ in layers:
        assert_sums_to(expl.contributions[name], expected, magnitude)
        assert expl.spatial[name].shape == (1, 2, 14, 14)
    (trace,) = expl.traces
    assert_sums_to(trace.contributions, expl.activations[trace.upper].gather(1, trace.upper_ids))
