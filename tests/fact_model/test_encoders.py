"""Reference encoders of the C²-score: built-in colour-texture, ground-truth oracle, DINOv2 ViT-S/14."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fact_model.analysis import encoders
from fact_model.analysis.encoders import (
    DINOV2_WEIGHTS_ENV,
    ColourTextureEncoder,
    DenseEncoder,
    DinoV2Encoder,
    DinoVisionTransformer,
    OracleEncoder,
    reference_encoder,
    srgb_to_lab,
)

RED = (0.9, 0.1, 0.1)
BLUE = (0.1, 0.2, 0.9)


def _halves(left: tuple[float, float, float], right: tuple[float, float, float], size: int = 64) -> torch.Tensor:
    """One ``(1, 3, size, size)`` image: ``left`` colour in the left half, ``right`` in the right half."""
    image = torch.empty(1, 3, size, size)
    image[..., : size // 2] = torch.tensor(left).view(1, 3, 1, 1)
    image[..., size // 2 :] = torch.tensor(right).view(1, 3, 1, 1)
    return image


# ----------------------------------------------------------------------------------------
# Built-in colour-texture encoder
# ----------------------------------------------------------------------------------------


def test_lab_conversion_matches_reference_values() -> None:
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).view(4, 3, 1, 1)
    lab = srgb_to_lab(rgb).view(4, 3)
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]])
    torch.testing.assert_close(lab, expected, atol=0.02, rtol=0)


def test_colour_texture_shape_dtype_and_determinism() -> None:
    encoder = ColourTextureEncoder()
    assert isinstance(encoder, DenseEncoder)
    assert 20 <= encoder.dim <= 40 and len(encoder.channel_names) == encoder.dim
    assert "built-in" in encoder.name
    images = torch.rand(5, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    features = encoder.encode(images)
    assert features.shape == (5, encoder.dim, 48, 40) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert torch.equal(features, encoder.encode(images.clone()))
    assert torch.equal(features, ColourTextureEncoder().encode(images))


def test_colour_texture_is_batch_independent() -> None:
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    together = ColourTextureEncoder(batch_size=4).encode(images)
    for i in range(len(images)):
        alone = ColourTextureEncoder(batch_size=1).encode(images[i : i + 1])
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-6, rtol=0)
    # Scaled inputs elsewhere in the batch do not move an image's features (no data-dependent normalisation).
    mixed = torch.cat([images[:1], images[1:] * 0.2])
    torch.testing.assert_close(ColourTextureEncoder().encode(mixed)[:1], together[:1], atol=1e-6, rtol=0)


def test_same_colour_same_features_different_colour_different_features() -> None:
    encoder = ColourTextureEncoder()
    red_blue = encoder.encode(_halves(RED, BLUE))
    all_red = encoder.encode(_halves(RED, RED))
    # Far from the red/blue edge (> 3σ of the widest scale), a flat red region reads like a red image.
    torch.testing.assert_close(red_blue[..., 10:54, 2:18], all_red[..., 10:54, 2:18], atol=1e-5, rtol=0)
    # Features are constant inside the flat region, with zero gradient and contrast channels.
    region = all_red[0, :, 10:54, 2:60]
    assert (region - region[:, :1, :1]).abs().max() < 1e-5
    texture = [i for i, name in enumerate(encoder.channel_names) if name.split("@")[0] not in ("L", "a", "b")]
    assert region[texture].abs().max() < 1e-5
    # Red and blue regions are far apart in feature space.
    red, blue = red_blue[0, :, 32, 5], red_blue[0, :, 32, 58]
    assert (red - blue).norm() > 1.0
    # The edge between them has gradient energy: ≈ ΔL/100 on the edge at every scale (the normalisation).
    lightness = srgb_to_lab(torch.tensor([RED, BLUE]).view(2, 3, 1, 1))[:, 0].flatten()
    step = (lightness[0] - lightness[1]).abs() / 100
    horizontal = [encoder.channel_names.index(f"grad_0@σ{s:g}") for s in encoder.scales]
    torch.testing.assert_close(red_blue[0, horizontal, 32, 30:34].amax(-1), step.expand(3), atol=0.15 * step, rtol=0)


def test_oriented_gradients_tell_stripe_directions_apart() -> None:
    encoder = ColourTextureEncoder()
    stripes = (torch.arange(48) // 3 % 2).float()  # period 6 px
    vertical_stripes = stripes.view(1, 1, 1, 48).expand(1, 3, 48, 48)  # intensity varies along x
    horizontal_stripes = stripes.view(1, 1, 48, 1).expand(1, 3, 48, 48)
    names = encoder.channel_names
    grad_x, grad_y = names.index("grad_0@σ1"), names.index("grad_90@σ1")
    v = encoder.encode(vertical_stripes)[0, :, 16:32, 16:32].mean((1, 2))
    h = encoder.encode(horizontal_stripes)[0, :, 16:32, 16:32].mean((1, 2))
    assert v[grad_x] > 10 * v[grad_y] and h[grad_y] > 10 * h[grad_x]
    torch.testing.assert_close(v[grad_x], h[grad_y])


def test_colour_texture_speed_sanity_and_input_checks() -> None:
    encoder = ColourTextureEncoder()
    features = encoder.encode(torch.rand(1000, 3, 48, 48, generator=torch.Generator().manual_seed(2)))
    assert features.shape == (1000, encoder.dim, 48, 48) and torch.isfinite(features).all()
    assert encoder.encode(torch.rand(0, 3, 8, 8)).shape == (0, encoder.dim, 8, 8)
    with pytest.raises(ValueError, match="floating point"):
        encoder.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encoder.encode(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        encoder.encode(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="scales"):
        ColourTextureEncoder(scales=(1.0, 0.0))


# ----------------------------------------------------------------------------------------
# Ground-truth oracle
# ----------------------------------------------------------------------------------------


def test_oracle_one_hot_by_index() -> None:
    maps = torch.randint(0, 5, (7, 12, 10), generator=torch.Generator().manual_seed(3))
    oracle = OracleEncoder(maps, num_labels=5)
    assert isinstance(oracle, DenseEncoder) and oracle.dim == 5 and "oracle" in oracle.name
    indices = torch.tensor([4, 0, 4])
    features = oracle.encode(torch.rand(3, 3, 12, 10), indices)
    assert features.shape == (3, 5, 12, 10) and features.dtype == torch.float32
    assert torch.equal(features.sum(1), torch.ones(3, 12, 10))
    assert torch.equal(features.argmax(1), maps[indices])
    assert torch.equal(oracle.encode(torch.rand(7, 3, 12, 10)).argmax(1), maps)  # all images, in order


def test_oracle_refuses_inconsistent_inputs() -> None:
    maps = torch.zeros(4, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="num_labels"):
        OracleEncoder(maps + 3, num_labels=3)
    with pytest.raises(ValueError, match="integer"):
        OracleEncoder(maps.float(), num_labels=3)
    oracle = OracleEncoder(maps, num_labels=3)
    with pytest.raises(ValueError, match="indices="):
        oracle.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        oracle.encode(torch.rand(1, 3, 8, 8), torch.tensor([4]))
    with pytest.raises(ValueError, match="resolution"):
        oracle.encode(torch.rand(1, 3, 16, 16), torch.tensor([0]))


# ----------------------------------------------------------------------------------------
# DINOv2 ViT-S/14
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_state() -> dict[str, torch.Tensor]:
    """A random-weight ViT-S/14 state dict (every parameter random, so nothing is trivially zero or one)."""
    generator = torch.Generator().manual_seed(4)
    model = DinoVisionTransformer()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.5 if name.endswith("gamma") else 0.05
            offset = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            parameter.copy_(offset + scale * torch.randn(parameter.shape, generator=generator))
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dinov2_files(dinov2_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("dinov2")
    pth, safetensors = directory / "dinov2_vits14_pretrain.pth", directory / "copy" / "vits14.safetensors"
    safetensors.parent.mkdir()
    torch.save(dinov2_state, pth)
    save_file(dinov2_state, safetensors)
    return pth, safetensors


def test_dinov2_architecture_matches_official_layout() -> None:
    state = DinoVisionTransformer().state_dict()
    assert len(state) == 4 + 12 * 14 + 2 + 1  # cls, pos, mask, patch conv (2); 14 per block; norm (2); total
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384) and state["mask_token"].shape == (1, 384)
    assert state["patch_embed.proj.weight"].shape == (384, 3, 14, 14)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384) and "blocks.11.attn.qkv.bias" in state
    assert state["blocks.0.mlp.fc1.weight"].shape == (4 * 384, 384)
    assert {"blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "norm.weight", "norm.bias", "cls_token"} <= set(state)


def test_dinov2_position_embeddings_interpolate() -> None:
    model = DinoVisionTransformer()
    assert model.position_embeddings(37, 37) is model.pos_embed
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.25  # constant embeddings stay constant under bicubic interpolation
    interpolated = model.position_embeddings(16, 12)
    assert interpolated.shape == (1, 1 + 16 * 12, 384)
    torch.testing.assert_close(interpolated[:, 1:], torch.full((1, 16 * 12, 384), 0.25))


def test_dinov2_loads_pth_and_safetensors_identically(
    dinov2_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the DINOv2 encoder tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    pth, safetensors = dinov2_files
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    from_pth = DinoV2Encoder(pth, device="cpu")
    from_safetensors = DinoV2Encoder(safetensors.parent, device="cpu", batch_size=2)  # a directory holding one
    assert isinstance(from_pth, DenseEncoder) and from_pth.dim == 384
    assert "DINOv2 ViT-S/14" in from_pth.name and from_pth.weights_sha256[:12] in from_pth.name
    features = from_pth.encode(images)
    assert features.shape == (3, 384, 48, 48) and features.dtype == torch.float32
    torch.testing.assert_close(from_safetensors.encode(images), features, atol=1e-5, rtol=0)
    assert features.std(dim=(2, 3)).mean() > 1e-3  # spatially varying, not a constant map
    assert not torch.allclose(features[0], features[1])
    # Other input sizes are resized to the model resolution and upsampled back.
    assert from_pth.encode(torch.rand(1, 3, 30, 20)).shape == (1, 384, 30, 20)


def test_dinov2_refuses_renamed_missing_or_extra_keys(dinov2_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    renamed = dict(dinov2_state)
    renamed["blocks.3.ls1.scale"] = renamed.pop("blocks.3.ls1.gamma")
    torch.save(renamed, tmp_path / "renamed.pth")
    expected = r"missing keys: blocks\.3\.ls1\.gamma.*unexpected keys: blocks\.3\.ls1\.scale"
    with pytest.raises(ValueError, match=expected):
        DinoV2Encoder(tmp_path / "renamed.pth", device="cpu")
    missing = {k: v for k, v in dinov2_state.items() if k != "norm.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: norm\.bias"):
        DinoV2Encoder(tmp_path / "missing.safetensors", device="cpu")
    registers = {**dinov2_state, "register_tokens": torch.zeros(1, 4, 384)}
    torch.save(registers, tmp_path / "reg4.pth")
    with pytest.raises(ValueError, match="unexpected keys: register_tokens"):
        DinoV2Encoder(tmp_path / "reg4.pth", device="cpu")
    torch.save({"model": dinov2_state}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="flat state dict"):
        DinoV2Encoder(tmp_path / "wrapped.pth", device="cpu")


def test_dinov2_missing_weights_name_the_flag_and_variable(tmp_path: Path, use_options) -> None:
    use_options(dinov2_weights=None)
    for weights in (None, tmp_path / "absent.pth", tmp_path):  # unset; no such file; a directory without weights
        with pytest.raises(FileNotFoundError) as error:
            DinoV2Encoder(weights)
        message = str(error.value)
        assert "--dinov2-weights" in message and DINOV2_WEIGHTS_ENV in message
        assert "dinov2_vits14_pretrain.pth" in message and "built-in" in message


def test_reference_encoder_falls_back_or_uses_dinov2(
    dinov2_files: tuple[Path, Path], tmp_path: Path, use_options
) -> None:
    use_options(dinov2_weights=None)
    encoder, warning = reference_encoder()
    assert isinstance(encoder, ColourTextureEncoder)
    assert warning is not None and "--dinov2-weights" in warning and DINOV2_WEIGHTS_ENV in warning
    assert encoder.name in warning
    use_options(dinov2_weights=str(dinov2_files[0]))
    encoder, warning = reference_encoder()
    assert isinstance(encoder, DinoV2Encoder) and warning is None
    use_options(dinov2_weights=str(tmp_path / "typo.pth"))  # configured but absent: an error
    with pytest.raises(FileNotFoundError, match="typo.pth"):
        reference_encoder()


def test_module_has_no_download_path() -> None:
    source = Path(encoders.__file__).read_text()
    for forbidden in ("torch.hub", "load_state_dict_from_url", "urllib", "requests", "urlopen"):
        assert forbidden not in source
