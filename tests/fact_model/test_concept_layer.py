"""The bias-free TopK concept layer against a dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fact_model.concept_layer import ConceptLayer


def dense_reference(layer: ConceptLayer, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = TopK(ReLU(E f))`` as a dense (P, K) matrix, and ``f̂ = D u``."""
    pre = F.relu(positions @ layer.encoder.t())
    threshold = pre.topk(layer.k, dim=-1).values[..., -1:]
    u = torch.where(pre >= threshold, pre, torch.zeros_like(pre))
    return u, u @ layer.decoder


def test_initialisation_follows_the_spec():
    layer = ConceptLayer(16, 64, 4)
    torch.testing.assert_close(layer.decoder.norm(dim=1), torch.ones(64))
    assert layer.decoder.shape == (64, 16) and layer.decoder.is_contiguous() and layer.encoder.is_contiguous()
    assert torch.equal(layer.encoder, layer.decoder)  # E = Dᵀ, and the decoder parameter holds Dᵀ
    assert not any("bias" in name for name, _ in layer.named_parameters())


def test_encode_decode_equal_dense_reference_feature_map():
    torch.manual_seed(0)
    layer = ConceptLayer(12, 40, 5).double()
    layer.encoder.data.normal_()
    features = torch.randn(3, 12, 4, 5, dtype=torch.double)
    codes = layer.encode(features)
    assert codes.values.shape == (3, 20, 5) and codes.spatial_shape == (4, 5)
    positions = features.flatten(2).transpose(1, 2)
    u, recon = dense_reference(layer, positions)
    torch.testing.assert_close(codes.totals(), u.sum(dim=1))
    assert ((u > 0).sum(-1) <= 5).all()
    torch.testing.assert_close(layer(features), recon.transpose(1, 2).reshape(3, 12, 4, 5))


def test_tokens_layout():
    torch.manual_seed(0)
    layer = ConceptLayer(8, 16, 3).double()
    tokens = torch.randn(2, 7, 8, dtype=torch.double)
    _, recon = dense_reference(layer, tokens)
    torch.testing.assert_close(layer(tokens), recon)
    assert layer.encode(tokens).spatial_shape == (7,)


def test_gradients_match_dense_reference():
    torch.manual_seed(0)
    layer = ConceptLayer(6, 10, 3).double()
    features = torch.randn(2, 6, 3, 3, dtype=torch.double, requires_grad=True)
    seed = torch.randn(2, 6, 3, 3, dtype=torch.double)
    grads = torch.autograd.grad((layer(features) * seed).sum(), [features, layer.encoder, layer.decoder])
    positions = features.flatten(2).transpose(1, 2)
    _, recon = dense_reference(layer, positions)
    reference = torch.autograd.grad(
        (recon.transpose(1, 2).reshape(2, 6, 3, 3) * seed).sum(), [features, layer.encoder, layer.decoder]
    )
    for ours, theirs in zip(grads, reference, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_encoder_vjp_equals_autograd_where_relu_is_inactive():
    """k = K keeps every concept, so many selected slots are ReLU-zero: their rows must not count."""
    torch.manual_seed(0)
    layer = ConceptLayer(6, 10, 10).double()
    features = torch.randn(2, 6, 3, 3, dtype=torch.double, requires_grad=True)
    codes = layer.encode(features)
    assert (codes.values == 0).any()
    seed = torch.randn_like(codes.values)
    (expected,) = torch.autograd.grad((codes.values * seed).sum(), features)
    torch.testing.assert_close(layer.encoder_vjp(codes, seed), expected)


def test_selection_helpers():
    torch.manual_seed(0)
    layer = ConceptLayer(6, 10, 3)
    codes = layer.encode(torch.randn(2, 6, 3, 3))
    ids = torch.tensor([[1, 2], [3, 4]])
    per_position = codes.per_position(codes.values, ids)
    assert per_position.shape == (2, 2, 3, 3)
    torch.testing.assert_close(per_position.sum(dim=(2, 3)), codes.totals().gather(1, ids))


@pytest.mark.parametrize(
    ("args", "shape", "message"),
    [
        ((8, 16, 17), None, "k (17) cannot exceed num_concepts (16)"),
        ((8, 0, 1), None, "num_concepts must be a positive int, got 0"),
        ((8, 16, 2), (2, 5, 3, 3), "ConceptLayer has in_features=8 but got features of shape (2, 5, 3, 3)"),
        ((8, 16, 2), (2, 8), "ConceptLayer expects (N, C, h, w) feature maps or (N, T, C) tokens, got shape (2, 8)"),
    ],
)
def test_bad_arguments_and_shapes(args, shape, message):
    with pytest.raises(ValueError) as info:
        layer = ConceptLayer(*args)
        layer(torch.randn(*shape))
    assert str(info.value) == message


def test_encoder_vjp_takes_many_seeds_at_once():
    torch.manual_seed(1)
    layer = ConceptLayer(6, 10, 3)
    codes = layer.encode(torch.randn(2, 6, 3, 3))
    seeds = torch.randn(4, *codes.values.shape)
    batched = layer.encoder_vjp(codes, seeds)
    assert batched.shape == (4, 2, 6, 3, 3)
    torch.testing.assert_close(batched, torch.stack([layer.encoder_vjp(codes, s) for s in seeds]))


def test_explanation_mode_makes_the_dictionary_a_constant():
    """Explanations differentiate activations only: no decoder gradient is built in explanation mode."""
    from fact_model.bcos import explanation_mode

    layer = ConceptLayer(6, 10, 3)
    features = torch.randn(2, 6, 3, 3, requires_grad=True)
    with explanation_mode(layer):
        recon = layer(features)
    assert torch.autograd.grad(recon.sum(), layer.decoder, allow_unused=True) == (None,)
    assert torch.autograd.grad(layer(features).sum(), layer.decoder)[0].abs().sum() > 0  # outside: trainable
