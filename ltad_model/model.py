"""LTAD's learnable parts (Ho, Peng, Vasconcelos, CVPR 2024), pure torch, in data-flow order.

Phase 1 (Sec. 5.1, Eq. 6): global embedding z --F_μ, F_σ--> ẑ ~ N(μ, σ); pseudo class name s_c
--frozen text encoder T (outside this file)--> t_c; D(ẑ ⊕ t_c) --> synthetic feature maps f^syn
at the real maps' shapes. Phase 2 (Sec. 5.3, Eq. 7–8): patch tokens p (real or synthetic)
--reconstruction module Π (UniAD's transformer, imported)--> S_rec (Eq. 1); --projections Φ_l,
pooled over layers (Eq. 2)--> p̂ --classifier (t_{n,c}, t_{a,c}) (Eq. 3–4)--> S_sem. Score
S = S_rec + λ S_sem (Eq. 5).

The frozen encoders E and T and all training loops live in `ltad_model/detector.py`; this file
holds only modules and pure functions, so that every tensor that enters or leaves is explicit.
Every choice where the paper is silent is listed, with its reason, in `ltad_model/README.md`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltbench.reconstruction import ReconstructionTransformer

if TYPE_CHECKING:  # the detector's config; only its model fields are read here
    from ltad_model.detector import LTADConfig


@dataclass(frozen=True)
class FeatureLayout:
    """Facts about the frozen encoders and the training set that fix the shapes of every module."""

    channels: tuple[int, ...]  # C_l of the L−1 feature maps, shallow to deep
    map_sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each map at the 224 input
    embed_dim: int  # size of the global embedding z = f_L (ALIGN: 640)
    text_dim: int  # d, size of a text embedding T(·) (ALIGN: 640)
    token_dim: int  # size of one word embedding, i.e. of one s_c token (ALIGN/BERT: 768)
    num_classes: int  # |C|, classes of the training split
    name_length: int  # K, tokens per pseudo class name s_c (Sec. 6: 2)
    grid: int  # side of the patch-token grid (stride 16: 14 at 224)

    @property
    def token_channels(self) -> int:
        """Channels of one patch token p_i: the L−1 layers concatenated."""
        return sum(self.channels)


# ----------------------------------------------------------------------------- phase 1: VAE


class LatentHeads(nn.Module):
    """F_μ and F_σ (Sec. 5.1): linear maps of z to the mean and log-variance of q(ẑ | z).

    F_σ predicts log σ² rather than σ so that σ stays positive without a clamp; with
    `variational=False` (the plain autoencoder of Tab. 6, expID 6.3) only F_μ exists and ẑ = μ.
    """

    def __init__(self, embed_dim: int, latent_dim: int, variational: bool):
        super().__init__()
        self.variational = variational
        self.mean = nn.Linear(embed_dim, latent_dim)  # F_μ
        self.log_variance = nn.Linear(embed_dim, latent_dim) if variational else None  # F_σ (as log σ²)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        mean = self.mean(z)  # (B, latent)
        log_variance = self.log_variance(z) if self.log_variance is not None else None  # (B, latent)
        return mean, log_variance

    @staticmethod
    def sample(mean: Tensor, log_variance: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """ẑ = μ + σ·ε, ε ~ N(0, I) from `generator` (drawn on its device); ẑ = μ for an autoencoder."""
        if log_variance is None:
            return mean
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + noise * torch.exp(0.5 * log_variance)  # (B, latent)


def kl_to_standard_normal(mean: Tensor, log_variance: Tensor, reduction: str = "sum") -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per image, averaged over the batch (a scalar).

    reduction: "sum" over latent dimensions (the KL of the distribution, Eq. 6 as printed) or
    "mean" over them (LTBench's earlier per-element balance).
    """
    per_dimension = 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance)  # (B, latent)
    return per_dimension.sum(dim=1).mean() if reduction == "sum" else per_dimension.mean()


def text_condition(text: Tensor) -> Tensor:
    """t_c for the decoder: L2-normalised and scaled by √d, so its entries have unit RMS like ẑ ~ N(0, I)."""
    return F.normalize(text, dim=-1) * math.sqrt(text.shape[-1])  # (B, d)


class UpBlock(nn.Module):
    """One decoder stage: resize to the target map size, then two 3×3 conv → GroupNorm → SiLU."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int]):
        super().__init__()
        self.size = size
        groups = math.gcd(out_channels, 8)  # GroupNorm: batch-size independent, identical in train and eval
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)  # (B, C_in, H, W)
        x = F.silu(self.norm1(self.conv1(x)))  # (B, C_out, H, W)
        return F.silu(self.norm2(self.conv2(x)))  # (B, C_out, H, W)


class FeatureDecoder(nn.Module):
    """D (Sec. 5.1): (ẑ ⊕ t_c) → the L−1 feature maps at the real maps' shapes.

    D mirrors the encoder's stages in reverse. The input vector is broadcast over a seed grid of
    half the deepest map's size (where E's last stage, which gave z, sits), with a learned
    position map added (a spatial-broadcast decoder); then one `UpBlock` per kept layer, deepest
    first, upsamples to that layer's size with as many channels as that layer, and a linear
    1×1 conv reads the layer's features out (encoder block outputs are not rectified).
    """

    def __init__(self, in_dim: int, channels: tuple[int, ...], map_sizes: tuple[tuple[int, int], ...]):
        super().__init__()
        deep_channels = channels[-1]
        deep_h, deep_w = map_sizes[-1]
        self.seed_size = (max(1, (deep_h + 1) // 2), max(1, (deep_w + 1) // 2))
        self.seed = nn.Linear(in_dim, deep_channels)
        self.seed_position = nn.Parameter(torch.zeros(deep_channels, *self.seed_size))
        stages, readouts = [], []
        previous = deep_channels
        for width, size in zip(reversed(channels), reversed(map_sizes)):
            stages.append(UpBlock(previous, width, tuple(size)))
            readouts.append(nn.Conv2d(width, width, 1))
            previous = width
        self.stages = nn.ModuleList(stages)  # deepest layer first
        self.readouts = nn.ModuleList(readouts)

    def forward(self, latent: Tensor) -> list[Tensor]:
        # latent: (B, latent + d), ẑ ⊕ t_c
        x = self.seed(latent)[:, :, None, None] + self.seed_position  # (B, C_deep, h0, w0)
        maps = []
        for stage, readout in zip(self.stages, self.readouts):
            x = stage(x)  # (B, C_l, H_l, W_l)
            maps.append(readout(x))
        return maps[::-1]  # shallow to deep, like the encoder's maps: [(B, C_l, H_l, W_l)]


def feature_reconstruction_loss(synthetic: list[Tensor], real: list[Tensor], reduction: str = "sum") -> Tensor:
    """The first term of Eq. 6, averaged over the L−1 layers and the batch.

    reduction: "sum" = ‖f^syn_l − f_l‖² summed over each layer's elements per image (Eq. 6 as
    printed); "mean" = each layer's per-element MSE (LTBench's earlier balance, which weighs the KL
    term 69–627× more relative to reconstruction).
    """
    if reduction == "sum":
        losses = [(fake - target).pow(2).flatten(1).sum(dim=1).mean() for fake, target in zip(synthetic, real)]
    else:
        losses = [F.mse_loss(fake, target) for fake, target in zip(synthetic, real)]
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- phase 2: detection


def reconstruction_score(reconstruction: Tensor, tokens: Tensor) -> Tensor:
    """S_rec (Eq. 1): ‖Π(p_i) − p_i‖² per patch. (B, N, C), (B, N, C) → (B, N)."""
    return (reconstruction - tokens).pow(2).sum(dim=-1)


class SemanticHead(nn.Module):
    """Φ_l and the layer pooling of Eq. 2: patch tokens (B, N, ΣC_l) → p̂ (B, N, d).

    pooling "max" (the paper) or "mean" apply one linear Φ_l per layer and pool over layers;
    "concat" is the single projection Φ̂ of the concatenated token (Tab. 7, expID 7.1).
    """

    def __init__(self, channels: tuple[int, ...], text_dim: int, pooling: str):
        super().__init__()
        self.channels = tuple(channels)
        self.pooling = pooling
        widths = [sum(channels)] if pooling == "concat" else list(channels)
        self.projections = nn.ModuleList(nn.Linear(width, text_dim) for width in widths)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.pooling == "concat":
            return self.projections[0](tokens)  # (B, N, d)
        parts = tokens.split(self.channels, dim=-1)  # L−1 × (B, N, C_l)
        projected = torch.stack([phi(part) for phi, part in zip(self.projections, parts)])  # (L−1, B, N, d)
        return projected.amax(dim=0) if self.pooling == "max" else projected.mean(dim=0)  # (B, N, d)


def semantic_logit(patches: Tensor, normal: Tensor, anomaly: Tensor, temperature: float) -> Tensor:
    """The anomaly logit of Eq. 3, (t_a·p̂ − t_n·p̂)/τ, so that S_sem = sigmoid(logit).

    The two-way softmax of Eq. 3 equals a sigmoid of the logit difference; keeping the logit
    lets the loss use the numerically stable `binary_cross_entropy_with_logits`.
    Parameters: patches: p̂ (B, N, d); normal, anomaly: t_{n,c}, t_{a,c} of each image's class (B, d).
    Returns: (B, N).
    """
    difference = (anomaly - normal)[:, None, :]  # (B, 1, d)
    return (patches * difference).sum(dim=-1) / temperature  # (B, N)


def combine_prompt_embeddings(embeddings: Tensor, normalize: bool) -> Tensor:
    """One classifier vector per class from an ensemble of prompts (Tab. 7, expID 7.3).

    Parameters: embeddings: (P, C, d), T([v_k; s_c]) for P prompts v_k.
    Returns: (C, d), the mean over prompts of the (optionally L2-normalised) embeddings,
    normalised again when `normalize` (the CLIP prompt-ensemble recipe); the embedding itself for P = 1.
    """
    if normalize:
        embeddings = F.normalize(embeddings, dim=-1)
    combined = embeddings.mean(dim=0)  # (C, d)
    return F.normalize(combined, dim=-1) if normalize else combined


def derangement(num_classes: int) -> Tensor:
    """Class i takes the pseudo name of class (i + 1) mod C: no class keeps its own (Tab. 8, expID 8.1)."""
    return (torch.arange(num_classes) + 1) % num_classes  # (C,)


# ----------------------------------------------------------------------------- the whole network


class LTADNetwork(nn.Module):
    """Every learnable part of LTAD, plus the phase-2 classifier vectors t_{n,c}, t_{a,c} as buffers.

    Submodules are built only when the config uses them: `latent`, `decoder` and `names` always
    (phase 1 is how s_c is learned), `reconstruction` (Π) when `use_rm`, `semantic` (Φ_l) when
    `use_sad`, `free_classifier` when `no_text_encoder`. The order of construction is fixed and
    the semantic parts come last, so Π starts from the same weights with or without SAD.
    """

    def __init__(self, layout: FeatureLayout, config: LTADConfig):
        super().__init__()
        self.layout = layout
        latent_dim = config.latent_dim or layout.embed_dim
        variational = config.augmentation != "ae"
        # s_c: K token embeddings per class; filled from the vocabulary by the detector (Sec. 6)
        self.names = nn.Parameter(torch.zeros(layout.num_classes, layout.name_length, layout.token_dim))
        self.latent = LatentHeads(layout.embed_dim, latent_dim, variational)
        self.decoder = FeatureDecoder(latent_dim + layout.text_dim, layout.channels, layout.map_sizes)
        self.reconstruction = (
            ReconstructionTransformer(
                layout.token_channels, grid=layout.grid, hidden=config.rm_hidden, heads=config.rm_heads,
                encoder_layers=config.rm_encoder_layers, decoder_layers=config.rm_decoder_layers,
                feedforward=config.rm_feedforward, dropout=config.rm_dropout, neighbor_size=config.rm_neighbor_size,
            )
            if config.use_rm
            else None
        )
        self.semantic = SemanticHead(layout.channels, layout.text_dim, config.layer_pooling) if config.use_sad else None
        if config.use_sad and config.no_text_encoder:
            # free per-class classifier weights t_{n,c}, t_{a,c} (Tab. 8, expID 8.2), randomly initialised
            self.free_classifier = nn.Parameter(torch.randn(layout.num_classes, 2, layout.text_dim) * 0.02)
        else:
            self.free_classifier = None
        # t_{n,c}, t_{a,c} from the frozen T and frozen s_c, computed once when phase 2 starts (Eq. 4)
        self.register_buffer("text_normal", torch.zeros(layout.num_classes, layout.text_dim))
        self.register_buffer("text_anomaly", torch.zeros(layout.num_classes, layout.text_dim))

    # -- phase 1 and the online augmentation of phase 2
    def synthesize(
        self, z: Tensor, class_text: Tensor, generator: torch.Generator | None
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """f^syn = D(ẑ ⊕ t_c) (Sec. 5.1).

        Parameters: z: global embeddings (B, embed_dim); class_text: T(s_c) of each image's class
        (B, d); generator: source of the reparameterisation noise.
        Returns: (the L−1 synthetic maps [(B, C_l, H_l, W_l)], μ (B, latent), log σ² (B, latent) or None).
        """
        mean, log_variance = self.latent(z)
        sampled = LatentHeads.sample(mean, log_variance, generator)  # (B, latent)
        maps = self.decoder(torch.cat([sampled, text_condition(class_text)], dim=-1))
        return maps, mean, log_variance

    # -- phase 2 and inference
    def classifier(self, normalize_text: bool) -> tuple[Tensor, Tensor]:
        """(t_n, t_a), each (C, d): the text-derived buffers, or the free weights without a text encoder."""
        if self.free_classifier is not None:
            normal, anomaly = self.free_classifier[:, 0], self.free_classifier[:, 1]
            if normalize_text:
                normal, anomaly = F.normalize(normal, dim=-1), F.normalize(anomaly, dim=-1)
            return normal, anomaly
        return self.text_normal, self.text_anomaly

    def semantic_logits(
        self, tokens: Tensor, class_idx: Tensor, config: LTADConfig, name_permutation: Tensor | None = None
    ) -> Tensor:
        """The anomaly logit of S_sem (Eq. 2–3) for every patch.

        Parameters: tokens: p (B, N, ΣC_l); class_idx: (B,); name_permutation: (C,) class → class
        whose pseudo name it uses (None: its own).
        Returns: (B, N); S_sem = sigmoid of it.
        """
        assert self.semantic is not None, "semantic_logits needs a model built with use_sad=True"
        patches = self.semantic(tokens)  # (B, N, d)
        if config.normalize_patches:
            patches = F.normalize(patches, dim=-1)
        normal, anomaly = self.classifier(config.normalize_text)  # (C, d) each
        index = class_idx if name_permutation is None else name_permutation.to(class_idx.device)[class_idx]
        return semantic_logit(patches, normal[index], anomaly[index], config.temperature)

    def patch_scores(
        self, tokens: Tensor, class_idx: Tensor, config: LTADConfig, lambda_sem: float,
        name_permutation: Tensor | None = None,
    ) -> Tensor:
        """S = S_rec + λ·S_sem (Eq. 5) per patch; S_rec alone without SAD, S_sem alone without RM.

        `config.score` "rec" / "sem" keeps one term of a model that has both (S_sem then unscaled).
        Parameters: tokens: p (B, N, ΣC_l); class_idx: (B,); lambda_sem: λ.
        Returns: (B, N).
        """
        score = torch.zeros(tokens.shape[:2], device=tokens.device)
        use_rec = self.reconstruction is not None and config.score != "sem"
        use_sem = self.semantic is not None and config.score != "rec"
        if use_rec:
            score = score + reconstruction_score(self.reconstruction(tokens), tokens)
        if use_sem:
            semantic = torch.sigmoid(self.semantic_logits(tokens, class_idx, config, name_permutation))
            score = score + (lambda_sem if use_rec else 1.0) * semantic
        return score


# ----------------------------------------------------------------------------- reading the learned names


def nearest_tokens(
    names: Tensor, vocabulary: Tensor, top: int, usable: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The vocabulary entries nearest (cosine) to each token of each pseudo class name.

    Parameters: names: s_c (C, K, token_dim); vocabulary: word-embedding table (V, token_dim);
    top: how many per token; usable: (V,) bool, False for entries never to return.
    Returns: (indices (C, K, top) int64, cosines (C, K, top)), nearest first.
    """
    cosines = F.normalize(names, dim=-1) @ F.normalize(vocabulary, dim=-1).T  # (C, K, V)
    if usable is not None:
        cosines = cosines.masked_fill(~usable.to(cosines.device), float("-inf"))
    values, indices = cosines.topk(min(top, vocabulary.shape[0]), dim=-1)
    return indices, values
