"""The FaCT concept layer: a bias-free TopK sparse autoencoder (spec section 3).

For every spatial position (CNN) or token (ViT) with feature ``f ∈ R^C``:

    u = TopK_k(ReLU(E f))      E: (K, C) encoder, no bias
    f̂ = D u                    D: (C, K) decoder, no bias (stored transposed, see below)

and the model continues from ``f̂``. ReLU and TopK are piecewise linear and there
is no bias, so ``u = M(f) E f`` with a 0/1 selection ``M(f)``: the layer keeps the
network dynamic-linear and every explanation identity exact.

``u`` is kept sparse: ``k`` values and their concept ids per position
(:class:`ConceptCodes`); decoding is a gather-sum of ``k`` decoder columns.
With Triton kernels on (the ``kernels`` option, :mod:`fact_model.options`) encode, decode
and :meth:`ConceptLayer.encoder_vjp` run the fused kernels of
:mod:`kernels.concept_encode` / :mod:`kernels.concept_decode` (same results).
The ``decoder`` parameter holds ``Dᵀ`` (``(K, C)``: row k is concept k's
direction), so that decoding gathers contiguous rows.
During training ``D``'s columns are kept unit-norm; the global feature-norm
factor is folded into ``E`` and ``D`` at save time, so a trained layer's columns
need not be unit-norm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fact_model.bcos.explanation_mode import Detachable

__all__ = ["ConceptCodes", "ConceptLayer"]


@dataclass(frozen=True)
class ConceptCodes:
    """Sparse concept activations of one concept layer for a batch.

    Attributes:
        values: ``(N, P, k)`` activations ``u`` of the selected concepts (≥ 0),
            part of the autograd graph.
        indices: ``(N, P, k)`` int64 concept ids of ``values``.
        spatial_shape: ``(h, w)`` for feature maps (``P = h·w``) or ``(T,)`` for tokens.
        num_concepts: ``K``.
        scales: ``(N, P, k)`` factors an intervention multiplied the encoder's codes by
            (``values`` are then ``scales ⊙ TopK(ReLU(E f))``), or None for unedited codes.
    """

    values: Tensor
    indices: Tensor
    spatial_shape: tuple[int, ...]
    num_concepts: int
    scales: Tensor | None = None

    def scaled(self, factors: Tensor) -> ConceptCodes:
        """These codes with every concept multiplied by its factor (an intervention).

        Args:
            factors: ``(N, K)`` factor per image and concept (1 leaves a concept unchanged, 0 removes it).
        """
        per_slot = factors.to(self.values.dtype).gather(1, self.indices.flatten(1)).view_as(self.values)
        if self.scales is not None:
            per_slot = per_slot * self.scales
        return replace(self, values=self.values * per_slot, scales=per_slot)

    def scatter(self, per_slot: Tensor) -> Tensor:
        """Sum ``per_slot`` ``(N, P, k)`` into per-concept totals ``(N, K)``."""
        n = per_slot.shape[0]
        out = per_slot.new_zeros(n, self.num_concepts)
        return out.scatter_add_(1, self.indices.flatten(1), per_slot.flatten(1))

    def totals(self) -> Tensor:
        """Total activation ``Σ_p u_{k,p}`` per image and concept: ``(N, K)``."""
        return self.scatter(self.values)

    def select(self, concept_ids: Tensor) -> Tensor:
        """0/1 masks ``(N, R, P, k)``: slot holds concept ``concept_ids[n, r]``.

        Args:
            concept_ids: ``(N, R)`` concept ids per image.
        """
        return (self.indices[:, None] == concept_ids[:, :, None, None]).to(self.values.dtype)

    def per_position(self, per_slot: Tensor, concept_ids: Tensor) -> Tensor:
        """Per-position sums of ``per_slot`` for given concepts: ``(N, R, *spatial_shape)``.

        Args:
            per_slot: ``(N, P, k)`` (e.g. ``u ⊙ ∂y/∂u``).
            concept_ids: ``(N, R)``.
        """
        summed = (self.select(concept_ids) * per_slot[:, None]).sum(dim=-1)  # (N, R, P)
        return summed.view(*summed.shape[:2], *self.spatial_shape)


class ConceptLayer(Detachable, nn.Module):
    """Bias-free TopK SAE applied per position; ``forward`` returns the reconstruction.

    In explanation mode (``detach_dynamic``, set by :func:`fact_model.bcos.explanation_mode`)
    the dictionary is a constant for autograd, as the B-cos filters are: explanations
    differentiate activations, never parameters, and a backward through the decoder
    then skips the ``(K, C)`` decoder gradient.

    Args:
        in_features: ``C``, channels of the feature map it is inserted into.
        num_concepts: ``K``, the dictionary size.
        k: active concepts per position (``1 ≤ k ≤ K``).

    Parameters: ``encoder`` ``(K, C)`` = ``E`` and ``decoder`` ``(K, C)`` = ``Dᵀ`` (row k
    is concept k's direction), initialised with unit-norm directions and
    ``E = Dᵀ``, i.e. ``encoder = decoder`` (spec section 3).
    """

    def __init__(
        self,
        in_features: int,
        num_concepts: int,
        k: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_concepts", num_concepts), ("k", k)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if k > num_concepts:
            raise ValueError(f"k ({k}) cannot exceed num_concepts ({num_concepts})")
        self.in_features = in_features
        self.num_concepts = num_concepts
        self.k = k
        directions = torch.randn(num_concepts, in_features, device=device, dtype=dtype)
        directions = directions / directions.norm(dim=1, keepdim=True)
        self.decoder = nn.Parameter(directions)
        self.encoder = nn.Parameter(directions.clone())

    def _positions(self, features: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``(N, C, h, w)`` or ``(N, T, C)`` → ``(N, P, C)`` and the spatial shape."""
        if features.ndim == 4:
            n, c, h, w = features.shape
            self._check_channels(c, features)
            return features.flatten(2).transpose(1, 2), (h, w)
        if features.ndim == 3:
            self._check_channels(features.shape[-1], features)
            return features, (features.shape[1],)
        raise ValueError(
            f"ConceptLayer expects (N, C, h, w) feature maps or (N, T, C) tokens, got shape {tuple(features.shape)}"
        )

    def _check_channels(self, c: int, features: Tensor) -> None:
        if c != self.in_features:
            raise ValueError(
                f"ConceptLayer has in_features={self.in_features} but got features of shape {tuple(features.shape)}"
            )

    def pre_activations(self, features: Tensor) -> Tensor:
        """``ReLU(E f)`` for every position: ``(N, P, K)`` (dense; for training and analysis)."""
        positions, _ = self._positions(features)
        return F.relu(positions @ self.encoder.t())

    def _use_kernels(self, tensor: Tensor) -> bool:
        """Whether the Triton concept kernels serve this call (the ``kernels`` option, device, dtype, ``k``).

        :mod:`kernels` is imported lazily: with the kernels off, ``import fact_model``
        never imports Triton. Graph export keeps the plain PyTorch ops.
        """
        if torch.compiler.is_exporting():
            return False
        from kernels._common import FLOAT_DTYPES, triton_runs_on

        if not triton_runs_on(tensor):
            return False
        from kernels.concept_encode import MAX_K

        return tensor.dtype in FLOAT_DTYPES and self.encoder.dtype == tensor.dtype and self.k <= MAX_K

    def top_k(
        self, pre_activations: Tensor, spatial_shape: tuple[int, ...] | None = None, *, sorted: bool = False
    ) -> ConceptCodes:
        """Sparse codes from dense pre-activations: the ``k`` largest ``ReLU(E f)`` per position.

        :meth:`encode` without the fused kernel, split in two for a caller that also needs
        the dense ``(N, P, K)`` pre-activations (training's auxiliary loss on dead concepts).

        Args:
            pre_activations: ``(N, P, K)`` from :meth:`pre_activations`.
            spatial_shape: ``(h, w)`` or ``(T,)`` of the positions (default ``(P,)``: tokens).
            sorted: slots in descending order of activation; otherwise in the order the
                top-k algorithm leaves them (the set is the same either way).
        """
        values, indices = pre_activations.topk(self.k, dim=-1, sorted=sorted)
        shape = spatial_shape if spatial_shape is not None else (pre_activations.shape[1],)
        return ConceptCodes(values, indices, shape, self.num_concepts)

    def encode(self, features: Tensor) -> ConceptCodes:
        """Sparse codes ``u = TopK_k(ReLU(E f))`` of every position."""
        positions, spatial_shape = self._positions(features)
        if self._use_kernels(positions):
            # Fused GEMM → ReLU → top-k (kernels/concept_encode.py): no dense (N, P, K) tensor.
            import kernels.concept_encode  # noqa: F401  (registers torch.ops.fact.concept_encode)

            n, p, c = positions.shape
            values, indices = torch.ops.fact.concept_encode(
                positions.reshape(n * p, c).contiguous(), self.encoder.contiguous(), self.k
            )
            return ConceptCodes(values.view(n, p, self.k), indices.view(n, p, self.k), spatial_shape, self.num_concepts)
        return self.top_k(F.relu(positions @ self.encoder.t()), spatial_shape)  # dense (N, P, K) in between

    def _gather_sum(self, weights: Tensor, indices: Tensor, table: Tensor) -> Tensor:
        """``Σ_j weights[m, j] · table[indices[m, j]]`` for ``(M, k)`` slots → ``(M, C)``, never a dense code."""
        if self._use_kernels(weights) and table.dtype == weights.dtype:
            import kernels.concept_decode  # noqa: F401  (registers torch.ops.fact.concept_decode)

            return torch.ops.fact.concept_decode(weights.contiguous(), indices.contiguous(), table.contiguous())
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")

    def decode(self, codes: ConceptCodes) -> Tensor:
        """Reconstruction ``f̂ = D u`` in the input layout (``(N, C, h, w)`` or ``(N, T, C)``)."""
        n, p, k = codes.values.shape
        if torch.compiler.is_exporting():
            # Same sum for graph export: ONNX has no EmbeddingBag, and its decomposition loops per bag.
            recon = (codes.values.unsqueeze(-1) * self.decoder[codes.indices]).sum(dim=-2)
            return self._to_layout(recon, codes)
        # Gather-sum of k decoder columns per position (never a dense (N·P, K) code).
        decoder = self.decoder.detach() if self.detach_dynamic else self.decoder
        recon = self._gather_sum(codes.values.reshape(n * p, k), codes.indices.reshape(n * p, k), decoder)
        recon = recon.view(n, p, self.in_features)
        return self._to_layout(recon, codes)

    def _to_layout(self, recon: Tensor, codes: ConceptCodes) -> Tensor:
        """``(N, P, C)`` → the input's layout (``(N, C, h, w)`` or ``(N, T, C)``)."""
        if len(codes.spatial_shape) == 2:
            return recon.transpose(1, 2).reshape(recon.shape[0], self.in_features, *codes.spatial_shape)
        return recon

    def encoder_vjp(self, codes: ConceptCodes, seed: Tensor) -> Tensor:
        """``∂(Σ seed ⊙ u)/∂f``: a vector–Jacobian product through the encoder, kept sparse.

        ``u_{p,j} = ReLU(E f_p)[id_{p,j}]``, so its gradient is the encoder row
        ``E[id_{p,j}]`` where the ReLU is active: a gather-sum of ``k`` rows per
        position, never the dense ``(N, P, K)`` Jacobian of ``TopK ∘ ReLU``. For codes an
        intervention scaled (``u' = s ⊙ u``) the row is multiplied by ``s``.

        Args:
            codes: the codes this layer produced for ``f``.
            seed: ``(N, P, k)`` weights of the code slots, or ``(R, N, P, k)``: R seeds at once.

        Returns:
            The gradient in the layout of ``f`` (``(N, C, h, w)`` or ``(N, T, C)``), with the
            seed's leading ``R`` if it has one.
        """
        n, p, k = codes.indices.shape
        lead = seed.shape[:-3]
        r = seed[..., 0, 0, 0].numel()
        # u ≥ 0, so a slot is active where its value is non-zero; scaled codes u' = s ⊙ u carry s.
        active = (codes.values.detach() != 0).to(seed.dtype)
        if codes.scales is not None:
            active = active * codes.scales.detach().to(seed.dtype)
        indices = codes.indices.reshape(n * p, k)
        grad = self._gather_sum(
            (seed * active).reshape(r * n * p, k), indices.repeat(r, 1) if r > 1 else indices, self.encoder.detach()
        ).view(r * n, p, self.in_features)
        if len(codes.spatial_shape) == 2:
            grad = grad.transpose(1, 2).reshape(r * n, self.in_features, *codes.spatial_shape)
        return grad.view(*lead, n, *grad.shape[1:])

    def forward(self, features: Tensor) -> Tensor:
        """Encode and decode: same shape as ``features``."""
        return self.decode(self.encode(features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_concepts={self.num_concepts}, k={self.k}"
