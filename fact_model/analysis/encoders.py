"""Reference encoders for the C²-score: images → dense per-pixel features.

The concept-consistency score compares the pixels a concept fires on in *another*
feature space, the reference encoder's. Every encoder here maps images ``(N, 3, H, W)``
float in ``[0, 1]`` to features ``(N, D, H, W)`` float32 at the input resolution
(upsampled bilinearly where the encoder works at a lower one). Centring the features by
the dataset mean is the caller's job, not the encoder's.

* :class:`DenseEncoder` — the protocol (``name``, ``dim``, ``encode``).
* :class:`ColourTextureEncoder` — the built-in encoder: hand-designed CIELAB colour,
  oriented-gradient and local-contrast features at three scales; no weights, deterministic,
  independent of the batch.
* :class:`OracleEncoder` — the ground-truth oracle: the one-hot part label per pixel.
* :class:`DinoV2Encoder` — DINOv2 ViT-S/14, implemented here in plain torch with the
  parameter names of the official checkpoint ``dinov2_vits14_pretrain.pth``, loaded from a
  file the user downloaded. Nothing in this module accesses the network.
* :func:`reference_encoder` — DINOv2 when weights are configured, else the built-in
  encoder and a message explaining the fallback.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from torch import Tensor, nn

from fact_model import options

__all__ = [
    "DINOV2_URL",
    "DINOV2_WEIGHTS_ENV",
    "ColourTextureEncoder",
    "DenseEncoder",
    "DinoV2Encoder",
    "DinoVisionTransformer",
    "OracleEncoder",
    "reference_encoder",
]

DINOV2_WEIGHTS_ENV = options.ENVIRONMENT["dinov2_weights"]
"""Environment variable naming the DINOv2 ViT-S/14 weights (a file or a directory holding one)."""

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
"""Where the official ViT-S/14 weights are published (for the user to download; never fetched here)."""

DINOV2_FILE = "dinov2_vits14_pretrain.pth"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


@runtime_checkable
class DenseEncoder(Protocol):
    """Maps images to dense per-pixel features.

    Attributes:
        name: human-readable description of the encoder; goes into every report.
        dim: number of feature channels ``D``.
    """

    name: str
    dim: int

    def encode(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Features of ``images``.

        Args:
            images: ``(N, 3, H, W)`` float RGB in ``[0, 1]``.
            indices: ``(N,)`` int64 indices of the images in their data set; only encoders that
                need them (the oracle) use them, the others ignore them.

        Returns:
            ``(N, D, H, W)`` float32 on the images' device; computed without gradients, in eval
            mode, in internal batches.
        """
        ...


def _check_images(images: Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is ``(N, 3, H, W)`` floating point in ``[0, 1]``."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floating point in [0, 1], got dtype {images.dtype}; convert uint8 images with "
            "images.float() / 255"
        )
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"images must lie in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]; "
            "pass unnormalised RGB (each encoder does its own normalisation)"
        )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


# ----------------------------------------------------------------------------------------
# Built-in colour-texture encoder
# ----------------------------------------------------------------------------------------

# sRGB (D65) linear RGB → XYZ, and the D65 reference white.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_LAB_DELTA = 6.0 / 29.0
_VARIANCE_FLOOR = 1e-6
"""Local variances of ``L/100`` below this (std < 0.1 L units, far below a visible difference) are float32
rounding noise of ``E[L²] − E[L]²`` and are set to 0, so flat regions have exactly zero contrast."""


def srgb_to_lab(images: Tensor) -> Tensor:
    """CIELAB (D65) of sRGB images.

    Args:
        images: ``(N, 3, H, W)`` float sRGB in ``[0, 1]``.

    Returns:
        ``(N, 3, H, W)`` float: ``L`` in ``[0, 100]``, ``a`` and ``b`` roughly in ``[-110, 100]``.
    """
    rgb = images.clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=images.dtype, device=images.device)
    white = torch.tensor(_WHITE_D65, dtype=images.dtype, device=images.device)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / white[:, None, None]
    f = torch.where(
        xyz > _LAB_DELTA**3, xyz.clamp_min(_LAB_DELTA**3) ** (1.0 / 3.0), xyz / (3 * _LAB_DELTA**2) + 4.0 / 29.0
    )
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def _gaussian_kernels(sigma: float) -> tuple[Tensor, Tensor]:
    """1-D Gaussian smoothing and first-derivative kernels for cross-correlation.

    Returns:
        ``(smooth, derivative)``, each ``(2r + 1,)`` float32 with ``r = ceil(3σ)``: ``smooth``
        sums to 1; ``derivative`` is antisymmetric and exact on a linear ramp (``Σ t·w(t) = 1``),
        so it measures the slope in units per pixel.
    """
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    smooth = torch.exp(-0.5 * (t / sigma) ** 2)
    smooth = smooth / smooth.sum()
    derivative = t * smooth
    derivative = derivative / (t * derivative).sum()
    return smooth.float(), derivative.float()


class ColourTextureEncoder:
    """The built-in reference encoder: hand-designed colour and texture features per pixel.

    Per scale ``σ`` (default 1, 2 and 4 px) it gives 8 channels, so ``D = 8 · len(scales)``
    (24 by default), in this order for each scale:

    * ``L, a, b`` — CIELAB colour blurred with a Gaussian of width ``σ``; divided by 100, so
      ``L`` ∈ ``[0, 1]`` and ``a, b`` ≈ ``[-1.1, 1]``;
    * oriented gradient energy of ``L`` — the absolute scale-normalised Gaussian derivative
      ``σ · |∂L_σ/∂θ|`` along θ = 0° (horizontal), 45°, 90° (vertical) and 135°, multiplied by
      ``√(2π) / 100`` so that an ideal black-to-white step edge across θ gives 1 on the edge at
      every scale;
    * local contrast — the standard deviation of ``L`` in a Gaussian window of width ``σ``,
      divided by 50 (a black/white edge gives 1 on the edge); standard deviations below 0.1 L
      units are float32 rounding noise and read 0.

    The normalisation constants are fixed, so features do not depend on the batch or the data
    set. Borders are handled by replicating the edge pixels, so flat images give zero texture
    features everywhere.

    Args:
        scales: Gaussian widths in pixels (each > 0).
        batch_size: images per internal batch (bounds memory).
    """

    CHANNELS_PER_SCALE = 8
    CHANNEL_NAMES_PER_SCALE = ("L", "a", "b", "grad_0", "grad_45", "grad_90", "grad_135", "contrast")

    def __init__(self, scales: tuple[float, ...] = (1.0, 2.0, 4.0), batch_size: int = 256) -> None:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty tuple of positive Gaussian widths in pixels, got {scales}")
        _check_batch_size(batch_size)
        self.scales = tuple(float(s) for s in scales)
        self.batch_size = batch_size
        self.dim = self.CHANNELS_PER_SCALE * len(self.scales)
        widths = ", ".join(f"{s:g}" for s in self.scales)
        self.name = (
            f"built-in colour-texture encoder (CIELAB + oriented gradients + local contrast, "
            f"{len(self.scales)} scales σ = {widths} px)"
        )
        self._kernels = [_gaussian_kernels(s) for s in self.scales]

    @property
    def channel_names(self) -> list[str]:
        """Name of each of the ``dim`` channels, e.g. ``"grad_45@σ2"``."""
        return [f"{c}@σ{s:g}" for s in self.scales for c in self.CHANNEL_NAMES_PER_SCALE]

    @torch.no_grad()
    def encode(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Features ``(N, dim, H, W)`` float32 of ``(N, 3, H, W)`` images in ``[0, 1]``; ``indices`` is ignored."""
        _check_images(images)
        if images.shape[0] == 0:
            return images.new_zeros((0, self.dim, *images.shape[2:]), dtype=torch.float32)
        return torch.cat([self._encode_batch(b.float()) for b in images.split(self.batch_size)])

    def _encode_batch(self, images: Tensor) -> Tensor:
        lab = srgb_to_lab(images) / 100.0
        luminance = lab[:, :1]
        # Shifting L before squaring keeps the variance E[L²] − E[L]² free of cancellation error.
        centred = luminance - 0.5
        stack = torch.cat([lab, centred * centred], dim=1)  # L, a, b, (L − ½)²
        edge_gain = math.sqrt(2 * math.pi)
        features = []
        for sigma, (smooth, derivative) in zip(self.scales, self._kernels, strict=True):
            smooth, derivative = smooth.to(images.device), derivative.to(images.device)
            along_x = _correlate(stack, smooth, dim=-1)
            blurred = _correlate(along_x, smooth, dim=-2)  # L, a, b, (L − ½)² at σ
            dx = _correlate(_correlate(luminance, derivative, dim=-1), smooth, dim=-2)
            dy = _correlate(along_x[:, :1], derivative, dim=-2)
            gain = sigma * edge_gain
            diagonal_1 = (dx + dy) * math.sqrt(0.5)
            diagonal_2 = (dy - dx) * math.sqrt(0.5)
            gradients = torch.cat([dx, diagonal_1, dy, diagonal_2], dim=1).abs() * gain
            mean_centred = blurred[:, :1] - 0.5
            variance = blurred[:, 3:4] - mean_centred * mean_centred
            variance = torch.where(variance > _VARIANCE_FLOOR, variance, torch.zeros_like(variance))
            contrast = variance.sqrt() * 2.0  # std of L/100, divided by 50/100
            features.extend([blurred[:, :3], gradients, contrast])
        return torch.cat(features, dim=1)


def _correlate(x: Tensor, kernel: Tensor, dim: int) -> Tensor:
    """Correlate every channel of ``x`` ``(N, C, H, W)`` with 1-D ``kernel`` along ``dim`` (-1: width, -2: height).

    Borders are padded by replicating the edge pixels (works for any image size).
    """
    channels = x.shape[1]
    radius = kernel.numel() // 2
    if dim == -1:
        weight = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        padded = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    else:
        weight = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        padded = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(padded, weight.contiguous().to(x.dtype), groups=channels)


# ----------------------------------------------------------------------------------------
# Ground-truth oracle
# ----------------------------------------------------------------------------------------


class OracleEncoder:
    """The ground-truth oracle: the one-hot part type of every pixel.

    It holds the part maps of a whole data set; :meth:`encode` looks up the maps of the
    given images by their ``indices``.

    Args:
        part_maps: ``(N, H, W)`` integer part labels in ``[0, num_labels)`` (e.g. 0 = background).
        num_labels: number of part types ``L`` (= ``dim``).
    """

    name = "ground-truth oracle (one-hot part type per pixel)"

    def __init__(self, part_maps: Tensor, num_labels: int) -> None:
        if not isinstance(part_maps, Tensor) or part_maps.ndim != 3:
            shape = tuple(part_maps.shape) if isinstance(part_maps, Tensor) else type(part_maps).__name__
            raise ValueError(f"part_maps must be a (N, H, W) tensor of integer labels, got {shape}")
        if part_maps.is_floating_point() or part_maps.is_complex() or part_maps.dtype == torch.bool:
            raise ValueError(f"part_maps must hold integer labels, got dtype {part_maps.dtype}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        if part_maps.numel() and (part_maps.min() < 0 or part_maps.max() >= num_labels):
            raise ValueError(
                f"part_maps labels must lie in [0, {num_labels - 1}], got labels in "
                f"[{part_maps.min().item()}, {part_maps.max().item()}]; is num_labels right?"
            )
        self.part_maps = part_maps.long()
        self.dim = num_labels

    @torch.no_grad()
    def encode(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """One-hot part maps ``(N, L, H, W)`` float32 (exactly one 1 per pixel) on the images' device.

        Args:
            images: ``(N, 3, H, W)`` images; only their number and size are used.
            indices: ``(N,)`` indices into the part maps; may be omitted only when ``images`` are
                all the images the oracle holds, in order.
        """
        _check_images(images)
        count = len(self.part_maps)
        if indices is None:
            if images.shape[0] != count:
                raise ValueError(
                    f"the oracle holds {count} part maps but got {images.shape[0]} images and no indices; "
                    "pass indices= (the images' positions in the data set)"
                )
            indices = torch.arange(count)
        indices = torch.as_tensor(indices)
        if indices.ndim != 1 or len(indices) != images.shape[0] or indices.is_floating_point():
            raise ValueError(
                f"indices must be a 1-D integer tensor with one entry per image ({images.shape[0]}), "
                f"got shape {tuple(indices.shape)} and dtype {indices.dtype}"
            )
        if len(indices) and (indices.min() < 0 or indices.max() >= count):
            raise ValueError(f"indices must lie in [0, {count - 1}], got [{indices.min()}, {indices.max()}]")
        if tuple(images.shape[2:]) != tuple(self.part_maps.shape[1:]):
            raise ValueError(
                f"images are {tuple(images.shape[2:])} but the part maps are {tuple(self.part_maps.shape[1:])}; "
                "encode the images at the part maps' resolution"
            )
        maps = self.part_maps[indices.cpu().long()].to(images.device)
        return F.one_hot(maps, self.dim).permute(0, 3, 1, 2).float().contiguous()


# ----------------------------------------------------------------------------------------
# DINOv2 ViT-S/14
# ----------------------------------------------------------------------------------------


class _PatchEmbed(nn.Module):
    """Non-overlapping ``p × p`` patches → tokens: ``(N, 3, H, W)`` → ``(N, (H/p)(W/p), D)``."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (both projections with bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class _Mlp(nn.Module):
    """Two-layer feed-forward network with exact GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _LayerScale(nn.Module):
    """Learned per-channel scale ``gamma`` of a residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1 x))``, then ``x + ls2(mlp(norm2 x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """The DINOv2 vision transformer (no register tokens), ViT-S/14 by default.

    Parameter names and shapes match the official checkpoints (``cls_token``, ``pos_embed``,
    ``mask_token``, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,
    norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``), so ``dinov2_vits14_pretrain.pth`` loads with
    ``strict=True``. The position embeddings are for a ``518 × 518`` image (37 × 37 patches)
    and are interpolated bicubically to other patch grids as DINOv2 does (with its 0.1
    scale-factor offset). ``mask_token`` is only used in training; it is kept for the strict load.

    Args:
        patch_size: patch side in pixels.
        embed_dim: token width ``D``.
        depth: number of blocks.
        num_heads: attention heads (``embed_dim`` must be divisible by it).
        mlp_ratio: hidden width of the MLP relative to ``embed_dim``.
        pretrain_size: image side the position embeddings were trained for.
    """

    INTERPOLATE_OFFSET = 0.1

    def __init__(
        self,
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        pretrain_size: int = 518,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.pretrain_grid = pretrain_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList([_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings ``(1, 1 + grid_h · grid_w, D)`` for a ``grid_h × grid_w`` patch grid."""
        size = self.pretrain_grid
        if (grid_h, grid_w) == (size, size):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.float().reshape(1, size, size, -1).permute(0, 3, 1, 2)
        scale = ((grid_h + self.INTERPOLATE_OFFSET) / size, (grid_w + self.INTERPOLATE_OFFSET) / size)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != (grid_h, grid_w):  # cannot happen for the offset 0.1; kept as a guard
            raise ValueError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, not {grid_h, grid_w}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Final-norm patch tokens as a grid.

        Args:
            x: ``(N, 3, H, W)`` ImageNet-normalised images, ``H`` and ``W`` multiples of ``patch_size``.

        Returns:
            ``(N, D, H / patch_size, W / patch_size)``.
        """
        n, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}×{width} is not a multiple of the patch size {self.patch_size}")
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embeddings(grid_h, grid_w)
        for block in self.blocks:
            tokens = block(tokens)
        patches = self.norm(tokens)[:, 1:]
        return patches.transpose(1, 2).reshape(n, self.embed_dim, grid_h, grid_w)


def _missing_weights_message(reason: str) -> str:
    return (
        f"{reason}. Give the DINOv2 ViT-S/14 weights with --dinov2-weights PATH or the {DINOV2_WEIGHTS_ENV} "
        f"environment variable (a .pth or .safetensors file, or a directory holding one). The official file "
        f"{DINOV2_FILE} is published at {DINOV2_URL}; download it yourself (this program never downloads). "
        "Without DINOv2 weights the built-in colour-texture encoder is used as the reference encoder instead."
    )


def resolve_dinov2_weights(weights: str | Path | None = None) -> Path:
    """The DINOv2 weights file: ``weights`` or, when ``None``, the ``FACT_DINOV2_WEIGHTS`` variable.

    A directory is searched for ``dinov2_vits14_pretrain.pth``, else for its only
    ``.pth`` / ``.pt`` / ``.safetensors`` file.

    Raises:
        FileNotFoundError: no path given, or it does not exist, or a directory holds no weights file.
        ValueError: a directory holds several candidate files, or the file has another suffix.
    """
    if weights is None or str(weights) == "":
        weights = options.current().dinov2_weights
        if weights is None:
            raise FileNotFoundError(
                _missing_weights_message(f"no DINOv2 weights given and {DINOV2_WEIGHTS_ENV} is unset")
            )
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(_missing_weights_message(f"DINOv2 weights {path} do not exist"))
    if path.is_dir():
        if (path / DINOV2_FILE).is_file():
            return path / DINOV2_FILE
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        if not candidates:
            raise FileNotFoundError(_missing_weights_message(f"directory {path} holds no .pth or .safetensors file"))
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise ValueError(f"directory {path} holds several weights files ({names}); pass the file itself")
        return candidates[0]
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise ValueError(f"DINOv2 weights {path} must be a .pth, .pt or .safetensors file, got suffix {path.suffix!r}")
    return path


def load_state_dict_file(path: Path) -> tuple[dict[str, Tensor], str]:
    """Read a state dict (``.safetensors``, or ``.pth`` / ``.pt`` with ``torch.load(weights_only=True)``).

    Returns:
        ``(state_dict, sha256)``: CPU tensors by name, and the hex sha256 of the file's bytes
        (hashed and parsed from the same bytes).

    Raises:
        ValueError: the file is not a readable state dict of tensors.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        if path.suffix == ".safetensors":
            state = safetensors_load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise assorted error types
        raise ValueError(f"cannot read {path} as a {path.suffix} state dict: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(
            f"{path} does not hold a flat state dict of tensors (got {type(state).__name__}); expected the "
            f"official {DINOV2_FILE} or a safetensors copy of it"
        )
    return state, digest


def _load_strict(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Copy ``state`` into ``model``; every key and shape must match exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or mismatched:

        def listing(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … ({len(items)} in all)" if len(items) > 8 else "")

        problems = [
            f"{label}: {listing(items)}"
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape", mismatched))
            if items
        ]
        raise ValueError(
            f"{path} is not a DINOv2 ViT-S/14 state dict ({'; '.join(problems)}); expected the official "
            f"{DINOV2_FILE} (ViT-S/14 without registers) or a safetensors copy with the same keys"
        )
    model.load_state_dict(state, strict=True)


class DinoV2Encoder:
    """DINOv2 ViT-S/14 final-norm patch tokens, upsampled to pixel resolution.

    Images are resized (bilinear, antialiased) to ``resolution``, normalised with the
    ImageNet mean and std, and encoded; the ``(N, 384, h, w)`` patch-token grid
    (``h = resolution[0] / 14``) is upsampled bilinearly to the input ``H × W``.

    Args:
        weights: the official ``dinov2_vits14_pretrain.pth`` (or a ``.safetensors`` copy, or a
            directory holding one); ``None`` reads ``FACT_DINOV2_WEIGHTS``.
        patch_size: patch side in pixels (14 for the official file).
        resolution: side (or ``(height, width)``) the images are resized to; multiples of
            ``patch_size``.
        batch_size: images per forward pass (bounds memory).
        device: where the model runs; ``None`` = CUDA when available, else CPU. Features are
            returned on the images' device.

    Raises:
        FileNotFoundError: no weights configured, or the path does not exist.
        ValueError: the file is not a ViT-S/14 state dict, or bad arguments.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        patch_size: int = 14,
        resolution: int | tuple[int, int] = 224,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if len(size) != 2 or any(s < patch_size or s % patch_size for s in size):
            raise ValueError(
                f"resolution must be a positive multiple of the patch size {patch_size} (e.g. 224 or 448), "
                f"got {resolution}"
            )
        _check_batch_size(batch_size)
        self.weights_path = resolve_dinov2_weights(weights)
        state, self.weights_sha256 = load_state_dict_file(self.weights_path)
        model = DinoVisionTransformer(patch_size=patch_size)
        _load_strict(model, state, self.weights_path)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.resolution: tuple[int, int] = (int(size[0]), int(size[1]))
        self.batch_size = batch_size
        self.dim = model.embed_dim
        self.name = (
            f"DINOv2 ViT-S/{patch_size} (final-norm patch tokens at {size[0]}×{size[1]}, bilinear upsampling; "
            f"{self.weights_path.name}, sha256 {self.weights_sha256[:12]})"
        )

    @torch.no_grad()
    def encode(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Features ``(N, 384, H, W)`` float32 of ``(N, 3, H, W)`` images in ``[0, 1]``; ``indices`` is ignored."""
        _check_images(images)
        height, width = images.shape[2:]
        if images.shape[0] == 0:
            return images.new_zeros((0, self.dim, height, width), dtype=torch.float32)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        outputs = []
        for batch in images.split(self.batch_size):
            x = batch.to(self.device, torch.float32)
            if tuple(x.shape[2:]) != self.resolution:
                x = F.interpolate(x, size=self.resolution, mode="bilinear", align_corners=False, antialias=True)
            grid = self.model((x - mean) / std)
            features = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            outputs.append(features.to(images.device))
        return torch.cat(outputs)


def reference_encoder(dinov2_weights: str | Path | None = None) -> tuple[DenseEncoder, str | None]:
    """The reference encoder for the C²-score, and a warning when it is the fallback.

    DINOv2 ViT-S/14 when weights are configured (``dinov2_weights``, else the
    ``FACT_DINOV2_WEIGHTS`` environment variable); otherwise the built-in
    :class:`ColourTextureEncoder` with a message explaining the fallback. Weights that are
    configured but missing or unreadable are an error, not a silent fallback.

    Returns:
        ``(encoder, warning)``: ``warning`` is ``None`` for DINOv2.

    Raises:
        FileNotFoundError: a configured weights path does not exist.
        ValueError: the configured file is not a ViT-S/14 state dict.
    """
    configured = dinov2_weights not in (None, "") or options.current().dinov2_weights is not None
    if configured:
        return DinoV2Encoder(dinov2_weights), None
    encoder = ColourTextureEncoder()
    warning = (
        f"no DINOv2 weights given (--dinov2-weights PATH or {DINOV2_WEIGHTS_ENV}), so the C²-score uses the "
        f"{encoder.name} as its reference encoder; its scores are not comparable with DINOv2-based ones. For the "
        f"paper's reference encoder, download {DINOV2_FILE} from {DINOV2_URL} and pass its path."
    )
    return encoder, warning
