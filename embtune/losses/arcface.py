"""ArcFace: classify each text's embedding among class centres with an additive angular margin."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ArcFace(nn.Module):
    """Additive angular margin loss (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss for Deep
    Face Recognition", eq. 3) with per-class margins from class frequency (the dynamic margin of Ha et
    al. 2020, "Google Landmark Recognition 2020 Competition Third Place Solution"):

        cos θ_ic = normalize(e_i) · normalize(W_c)                      W [num_classes, D], learnt
        logit_ic = s·cos(θ_ic + m_c) if c = y_i, else s·cos θ_ic;       loss = CE(logits, y)
        m_c = margin_min + (margin − margin_min)·(n_c^−λ − min n^−λ) / (max n^−λ − min n^−λ)

    so the rarest class gets ``margin`` and the most frequent ``margin_min`` (Ha et al.: λ = 1/4,
    margins in [0.05, 0.5]). Where θ + m would pass π, cos(θ + m) stops decreasing; as in the reference
    implementations (insightface; arcface-pytorch) the target logit is then cos θ − m·sin m, used when
    cos θ <= cos(π − m) ("easy_margin": keep cos θ itself when cos θ <= 0). margin 0 with
    adaptive_margin false is the plain softmax cross-entropy on s·cos θ (normalised softmax).
    ``temperature`` reports 1/s, so that every loss logs the same knob.

    The class centres W are parameters: the loop gives them a learning rate ``weight_lr_multiplier``
    times the encoder's. Built lazily: when num_classes or embedding_dim is None, call
    ``build(num_classes, embedding_dim)`` (or ``init_weights(class_means)``) before forward and
    before the optimiser is made; with adaptive_margin, also ``set_class_counts(counts)``.

    Input kind "embeddings"; data format: pointwise (text, class label). Needs no negatives.

    Args:
        num_classes, embedding_dim: shape of W (None: build later).
        scale: s > 0 (30.0), = 1/τ.
        margin: m in [0, π/2] radians (0.5); with adaptive_margin, the rarest class's margin.
        adaptive_margin: per-class margins from ``set_class_counts`` (True).
        margin_min: the most frequent class's margin, in [0, margin] (0.05).
        margin_exponent: λ > 0 in n_c^−λ (0.25).
        easy_margin: the other fallback for θ + m > π (False).
        weight_lr_multiplier: learning-rate factor for W (10.0).
    Inputs:
        embeddings [B,D]: text embeddings (normalised here, whether or not the model did).
        labels [B]: int64 class of each text, in 0..num_classes−1.
    Raises:
        ValueError: settings out of range, shapes that do not match W, labels out of range.
        RuntimeError: forward before build, or before set_class_counts when adaptive_margin.
    """

    name = "arcface"
    input_kind = "embeddings"
    needs_negatives = False
    eps = 1e-6  # floor on sin²θ, so the gradient of cos(θ + m) stays finite at θ = 0

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, scale: float = 30.0,
                 margin: float = 0.5, adaptive_margin: bool = True, margin_min: float = 0.05,
                 margin_exponent: float = 0.25, easy_margin: bool = False, weight_lr_multiplier: float = 10.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"loss.scale must be > 0, got {scale}")
        if not 0 <= margin <= math.pi / 2:
            raise ValueError(f"loss.margin must be in [0, π/2] radians, got {margin}")
        if adaptive_margin and not 0 <= margin_min <= margin:
            raise ValueError(f"need 0 <= loss.margin_min <= loss.margin, got {margin_min}, {margin}")
        if margin_exponent <= 0:
            raise ValueError(f"loss.margin_exponent must be > 0, got {margin_exponent}")
        if (num_classes is None) != (embedding_dim is None):
            raise ValueError("give both loss.num_classes and loss.embedding_dim, or neither (built later)")
        self.scale, self.margin, self.adaptive_margin = float(scale), float(margin), adaptive_margin
        self.margin_min, self.margin_exponent, self.easy_margin = margin_min, margin_exponent, easy_margin
        self.weight_lr_multiplier = weight_lr_multiplier
        self.register_parameter("weight", None)
        self.register_buffer("class_margins", None)
        if num_classes is not None:
            self.build(num_classes, embedding_dim)

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def build(self, num_classes: int, embedding_dim: int) -> None:
        """Create W [num_classes, embedding_dim] (Xavier-uniform); a no-op if built with that shape.

        Raises:
            ValueError: a size < 1, or W already built with another shape.
        """
        if self.weight is not None:
            if tuple(self.weight.shape) != (num_classes, embedding_dim):
                raise ValueError(f"arcface already built for {tuple(self.weight.shape)} classes × dim, "
                                 f"asked for ({num_classes}, {embedding_dim})")
            return
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(f"arcface needs num_classes, embedding_dim >= 1, got {num_classes}, {embedding_dim}")
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_classes, embedding_dim)))

    def init_weights(self, class_means: Tensor) -> None:
        """Set W from each class's mean embedding [num_classes, D], building W if needed; classes whose
        mean is all zeros (no texts) keep their random centre."""
        if class_means.dim() != 2:
            raise ValueError(f"class_means must be [num_classes, D], got {tuple(class_means.shape)}")
        self.build(*class_means.shape)
        with torch.no_grad():
            means = class_means.to(self.weight)
            has = means.norm(dim=1) > 0
            self.weight[has] = F.normalize(means[has], dim=1)

    def set_class_counts(self, counts: Tensor) -> None:
        """Per-class margins m_c from the number of training texts of each class, counts [num_classes].

        Raises:
            ValueError: counts not 1-D, negative, or of another length than W's num_classes.
        """
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.dim() != 1 or (counts < 0).any():
            raise ValueError(f"class counts must be a 1-D tensor of non-negative numbers, got {counts.shape}")
        if self.weight is not None and counts.numel() != self.weight.size(0):
            raise ValueError(f"{counts.numel()} class counts for {self.weight.size(0)} classes")
        x = counts.clamp(min=1) ** -self.margin_exponent
        span = x.max() - x.min()
        unit = (x - x.min()) / span if span > 0 else torch.ones_like(x)  # 1 for the rarest class
        device = self.weight.device if self.weight is not None else None
        self.class_margins = (self.margin_min + (self.margin - self.margin_min) * unit).float().to(device)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.weight is None:
            raise RuntimeError("arcface has no class weights yet: call build(num_classes, embedding_dim) or "
                               "init_weights(class_means) before training")
        if self.adaptive_margin and self.class_margins is None:
            raise RuntimeError("arcface with adaptive_margin=true needs set_class_counts(counts) before training")
        num_classes, dim = self.weight.shape
        if embeddings.dim() != 2 or embeddings.size(1) != dim or labels.shape != embeddings.shape[:1]:
            raise ValueError(f"arcface needs embeddings [B,{dim}] and labels [B], got {tuple(embeddings.shape)} "
                             f"and {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"arcface labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        cos = F.normalize(embeddings.to(dtype), dim=1) @ F.normalize(self.weight.to(dtype), dim=1).T  # [B,N]
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)  # [B]: cos θ of the true class
        if self.adaptive_margin:
            m = self.class_margins[labels].to(dtype)
        else:
            m = torch.full_like(cos_y, self.margin)
        sin_y = (1 - cos_y**2).clamp(min=self.eps).sqrt()
        phi = cos_y * m.cos() - sin_y * m.sin()  # cos(θ + m)
        if self.easy_margin:
            phi = torch.where(cos_y > 0, phi, cos_y)
        else:
            phi = torch.where(cos_y > torch.cos(math.pi - m), phi, cos_y - m.sin() * m)
        logits = cos.scatter(1, labels[:, None], phi[:, None]) * self.scale
        return F.cross_entropy(logits, labels)
