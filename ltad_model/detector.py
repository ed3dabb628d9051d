"""The `ltad` and `ltad_wo_sad` detectors: LTAD's two training phases, its score, and persistence.

fit: encode the training images once through the feature cache (E is frozen), then
phase 1 (Sec. 5.1, Eq. 6) learns the VAE (F_μ, F_σ, D) and the pseudo class names s_c, and
phase 2 (Sec. 5.2–5.3, Eq. 7–8) learns Π and Φ_l on real or synthetic features with feature-jitter
pseudo-anomalies, s_c frozen. Every epoch leaves a resumable training state in the checkpoint
folder; each epoch draws its randomness from its own seed, so a resumed run is bit-identical to an
uninterrupted one. predict: S = S_rec + λ S_sem per patch (Eq. 5) on the 14×14 grid, upsampled to
224×224; image score = max of the 16×16 average-pooled map (evaluation protocol).
The spec, with every choice the paper leaves open, is `ltad_model/README.md`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ltad_model.diagnostics import collapse_check, lambda_balance, report_balance
from ltad_model.diagnostics import spread as _spread
from ltad_model.model import (
    FeatureLayout,
    LTADNetwork,
    combine_prompt_embeddings,
    derangement,
    feature_reconstruction_loss,
    kl_to_standard_normal,
    nearest_tokens,
    reconstruction_score,
)
from ltbench import distributed
from ltbench.detector import (
    Prediction,
    TrainSet,
    make_config,
    prediction_from_maps,
    read_meta,
    read_saved_model,
)
from ltbench.errors import ConfigError, DetectorError
from ltbench.feature_cache import as_stored
from ltbench.feature_detector import (
    FeatureDetector,
    FeatureMeta,
    TrainingFeatures,
    grid_to_image,
    patch_tokens,
)
from ltbench.reconstruction import feature_jitter, transformer_problems
from ltbench.training import EpochBatches, TrainingProgress, adamw_step_decay, epoch_seed, optimizer_step

LAMBDA_SAMPLE_IMAGES = 256  # training images the λ rule looks at (the first ones, in split order)
# λ of Eq. 5 in the paper (Sec. 6, "Training details"), keyed by the paper dataset whose classes they are
PAPER_LAMBDA = {"mvtec": 500.0, "visa": 400.0, "dagm": 300.0}


@dataclass(frozen=True)
class LTADConfig:
    """Configuration of LTAD; defaults are the paper's (Sec. 6, App. A.2) unless a comment says otherwise."""

    # frozen encoders and features
    backbone: str = "align"  # E and T (Sec. 6: ALIGN; its layers {3, 10, 17, 37} are picked by ltbench.backbones)
    grid: int = 14  # patch-token grid side, stride 16 at 224 (Π is UniAD's transformer on UniAD's 14×14 grid)
    antialias: bool = False  # antialiased bilinear resize of the maps to the grid (False: 112²→14² samples 1/4 of map 1)
    # pseudo class names s_c (Sec. 4, 5.1)
    name_length: int = 2  # K, tokens per s_c (Sec. 6, Fig. 6)
    name_init: Literal["object", "classname", "random"] = "object"  # init of s_c (Sec. 6; Tab. 6 expIDs 6.5–6.8)
    learn_names: bool = True  # learn s_c in phase 1 (Tab. 6: "use learned s_c")
    # phase 1: class-sensitive augmentation (Sec. 5.1, Eq. 6)
    augmentation: Literal["vae", "ae", "none"] = "vae"  # phase-2 synthetic features from the VAE, a plain AE, or none (Tab. 6)
    latent_dim: int | None = None  # size of ẑ; None = size of z (not given in the paper)
    kl_weight: float = 1.0  # weight of the KL term (Eq. 6 weighs it 1)
    # Eq. 6 as printed: squared error summed over each layer's elements (mean over layers), KL summed over latent
    # dimensions, per image; "mean": per-element means of both (LTBench before 0.2; weighs KL 69–627× more on ALIGN)
    phase1_loss: Literal["sum", "mean"] = "sum"
    epochs_phase1: int = 100  # Sec. 6
    # phase 2: detection (Sec. 5.2–5.3, Eq. 7–8)
    epochs_phase2: int = 500  # Sec. 6
    real_probability: float = 0.5  # p_c, probability that a sample uses its real features (Sec. 6)
    distribution_aware_sampling: bool = False  # synthetic probability ∝ 1 / class size, mean 1 − p_c (Tab. 6 "DAS")
    jitter_scale: float = 20.0  # pseudo-anomaly noise N(0,1)·‖p‖/C·scale (Sec. 5.2 follows UniAD [76]; UniAD's 20)
    jitter_prob: float = 1.0  # probability a batch is jittered (UniAD's 1)
    use_rm: bool = True  # reconstruction module Π and S_rec (Tab. 7 turns it off)
    rm_hidden: int = 256  # Π sizes: UniAD's official config (App. A.1: LTAD's RM is UniAD's transformer)
    rm_heads: int = 8  # Π attention heads (UniAD)
    rm_encoder_layers: int = 4  # Π encoder layers (UniAD)
    rm_decoder_layers: int = 4  # Π decoder layers (UniAD)
    rm_feedforward: int = 1024  # Π feed-forward width (UniAD)
    rm_dropout: float = 0.1  # Π dropout (UniAD)
    rm_neighbor_size: int = 7  # Π neighbour-mask window (UniAD)
    # Π sees standardised tokens (per-channel mean/std of the real training tokens, ltbench.reconstruction):
    # same functions, loss and score, reached in fewer steps; False is UniAD's network as released. Off in every
    # preset: on synth/exp100 quick it changed image AUROC by +0.15 (bench/recon/README.md), unlike UniAD's +2.95
    rm_standardize: bool = False
    use_sad: bool = True  # semantic AD module and S_sem ("LTAD w/o SAD" when False, Tab. 3–6)
    layer_pooling: Literal["max", "mean", "concat"] = "max"  # Eq. 2 max; Tab. 7 mean, or one projection of the concatenation
    normal_prompts: tuple[str, ...] = ("a",)  # v_n (Sec. 6; several = a prompt ensemble, Tab. 7 expID 7.3)
    anomaly_prompts: tuple[str, ...] = ("a broken",)  # v_a (Sec. 6, Tab. 9)
    temperature: float = 1.0  # τ of Eq. 3 (Sec. 6)
    normalize_text: bool = True  # L2-normalise t_{n,c}, t_{a,c} before the dot product (paper silent; README)
    normalize_patches: bool = False  # L2-normalise p̂ before the dot product (paper silent; README)
    no_text_encoder: bool = False  # free per-class classifier weights instead of T([v; s_c]) (Tab. 8 expID 8.2)
    shuffle_names_at_test: bool = False  # class i uses s_{(i+1) mod C} at test time (Tab. 8 expID 8.1)
    lambda_sem: float | None = None  # λ of Eq. 5; None: paper value for MVTec/VisA/DAGM classes, else the README rule
    score: Literal["both", "rec", "sem"] = "both"  # test time: Eq. 5 (both), S_rec only, or S_sem only (diagnostics)
    # optimisation (Sec. 6: AdamW, lr 1e-4; App. A.2: batch 8)
    batch_size: int = 8  # App. A.2
    lr: float = 1e-4  # Sec. 6
    weight_decay: float = 1e-4  # AdamW weight decay, UniAD's (paper silent); never applied to s_c
    lr_drop_at: float = 0.8  # StepLR step as a fraction of each phase's epochs (UniAD's 800 of 1000; paper silent)
    lr_drop_factor: float = 0.1  # StepLR gamma (UniAD)
    grad_clip: float | None = 0.1  # gradient-norm clip, per learned part (UniAD's 0.1; paper silent); None = off
    seed: int = 0  # module init, batch order, sampling, noise and dropout

    def __post_init__(self) -> None:
        # JSON and --set may give lists or a bare string; keep the frozen config hashable
        for name in ("normal_prompts", "anomaly_prompts"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        problems = []
        choices = {"name_init": ("object", "classname", "random"), "augmentation": ("vae", "ae", "none"),
                   "layer_pooling": ("max", "mean", "concat"), "phase1_loss": ("sum", "mean"),
                   "score": ("both", "rec", "sem")}
        for name, options in choices.items():
            if getattr(self, name) not in options:
                problems.append(f"{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")
        if not self.backbone:
            problems.append("backbone must name a backbone (align, lite, tiny-align, align:/local/dir)")
        if self.grid < 1 or self.name_length < 1:
            problems.append(f"grid ({self.grid}) and name_length ({self.name_length}) must be >= 1")
        if self.latent_dim is not None and self.latent_dim < 1:
            problems.append(f"latent_dim must be >= 1 or None, got {self.latent_dim}")
        if self.kl_weight < 0:
            problems.append(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.epochs_phase1 < 0 or self.epochs_phase2 < 1 or self.batch_size < 1:
            problems.append("epochs_phase1 must be >= 0, epochs_phase2 and batch_size >= 1")
        if not 0.0 <= self.real_probability <= 1.0 or not 0.0 <= self.jitter_prob <= 1.0:
            problems.append("real_probability and jitter_prob must be in [0, 1]")
        if self.jitter_scale < 0:
            problems.append(f"jitter_scale must be >= 0, got {self.jitter_scale}")
        if (self.score == "rec" and not self.use_rm) or (self.score == "sem" and not self.use_sad):
            problems.append(f"score={self.score!r} needs the module that computes it (use_rm / use_sad)")
        if not (self.use_rm or self.use_sad):
            problems.append("use_rm and use_sad cannot both be False: nothing would score anomalies")
        problems += transformer_problems(self.rm_hidden, self.rm_heads, self.rm_encoder_layers, self.rm_decoder_layers,
                                         self.rm_feedforward, self.rm_dropout, self.rm_neighbor_size, self.grid, "rm_")
        if not self.normal_prompts or not self.anomaly_prompts:
            problems.append("normal_prompts and anomaly_prompts need at least one prompt each (e.g. 'a', 'a broken')")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if (self.no_text_encoder or self.shuffle_names_at_test) and not self.use_sad:
            problems.append("no_text_encoder and shuffle_names_at_test change the SAD module; they need use_sad=True")
        if self.lambda_sem is not None and self.lambda_sem < 0:
            problems.append(f"lambda_sem must be >= 0 or None, got {self.lambda_sem}")
        if self.lr <= 0 or self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            problems.append("lr must be > 0, weight_decay >= 0, grad_clip > 0 or None")
        if not 0.0 < self.lr_drop_at <= 1.0 or not 0.0 < self.lr_drop_factor <= 1.0:
            problems.append("lr_drop_at and lr_drop_factor must be in (0, 1]")
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))


@dataclass(frozen=True)
class LTADWithoutSADConfig(LTADConfig):
    """LTAD without the semantic AD module (the paper's "LTAD w/o SAD", Tab. 3–6): S = S_rec."""

    use_sad: bool = False  # the only difference from LTADConfig


@dataclass(frozen=True)
class LTADMeta(FeatureMeta):
    """What LTAD learns about its data and encoders in `fit` (saved in config.json); it sizes the network."""

    feature_channels: tuple[int, ...]  # C_l of the L−1 maps, shallow to deep
    map_sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of the maps
    embed_dim: int  # size of the image embedding z
    text_dim: int  # size of T's output
    token_dim: int  # size of T's word embeddings (the space of s_c)
    class_counts: tuple[int, ...]  # training images per class (over all ranks)
    name_length: int  # K', tokens per s_c
    grid: int  # patch-token grid side
    lambda_sem: float | None  # λ of Eq. 5 (None: one score only)
    lambda_rule: str | None  # where λ came from: config, paper (dataset) or training range
    rec_spread: float | None  # spread (99th − 1st percentile) of S_rec over clean training patches
    sem_spread: float | None  # the same for S_sem


class LTAD(FeatureDetector):
    """LTAD (Ho, Peng, Vasconcelos, CVPR 2024): reconstruction + semantic AD with learned pseudo class names."""

    Config: ClassVar[type] = LTADConfig
    Meta: ClassVar[type] = LTADMeta
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the paper's schedule (Sec. 6) on ALIGN
        "paper": {"backbone": "align", "epochs_phase1": 100, "epochs_phase2": 500},
        # a CPU run on synth/* in about 5 minutes (timings in ltad_model/README.md): few epochs and a
        # smaller Π without dropout, since UniAD's full-size Π alone costs ~0.6 CPU-s per image per epoch
        "quick": {"backbone": "lite", "epochs_phase1": 2, "epochs_phase2": 5, "lr": 5e-4, "rm_hidden": 64,
                  "rm_heads": 4, "rm_encoder_layers": 2, "rm_decoder_layers": 2, "rm_feedforward": 256,
                  "rm_dropout": 0.0},
    }

    # ------------------------------------------------------------------ module and features

    def build_module(self, meta: LTADMeta) -> nn.Module:
        """The learnable network sized by `meta`."""
        return LTADNetwork(self._layout(meta), self.config)

    def _layout(self, meta: LTADMeta) -> FeatureLayout:
        return FeatureLayout(
            channels=tuple(meta.feature_channels), map_sizes=tuple(tuple(s) for s in meta.map_sizes),
            embed_dim=meta.embed_dim, text_dim=meta.text_dim, token_dim=meta.token_dim,
            num_classes=len(meta.class_names), name_length=meta.name_length, grid=meta.grid,
        )

    def _tokens(self, maps: list[Tensor]) -> Tensor:
        """The L−1 maps → patch tokens p (B, N, ΣC_l) on the grid, in layer order (N = grid², row-major)."""
        return patch_tokens(maps, self.config.grid, antialias=self.config.antialias)

    # ------------------------------------------------------------------ training

    def learn(self, train: TrainSet, device: torch.device) -> tuple[nn.Module, LTADMeta]:
        """Run phase 1 and phase 2 on the normal images of `train` (resuming from its checkpoint folder)."""
        c = self.config
        class_names = list(train.class_names)
        if c.shuffle_names_at_test and len(class_names) < 2:
            raise DetectorError("shuffle_names_at_test needs at least 2 classes to give each class another's name")
        backbone = self.backbone(device)
        encoder, text = backbone.image, backbone.text
        data = self.encode_training_set(train)  # every rank's images on every rank
        names = initial_names(text, class_names, c.name_init, c.name_length, c.seed)  # (C, K, token_dim)
        meta = LTADMeta(
            backbone=c.backbone, backbone_digest=encoder.digest, feature_layers=tuple(encoder.layer_names),
            class_names=tuple(class_names), feature_channels=tuple(int(m.shape[1]) for m in data.maps),
            map_sizes=tuple((int(m.shape[2]), int(m.shape[3])) for m in data.maps),
            embed_dim=int(data.embeddings.shape[1]), text_dim=int(text.dim), token_dim=int(text.token_dim),
            class_counts=tuple(torch.bincount(data.class_idx, minlength=len(class_names)).tolist()),
            name_length=int(names.shape[1]), grid=c.grid, lambda_sem=None, lambda_rule=None,
            rec_spread=None, sem_spread=None,
        )
        torch.manual_seed(c.seed)
        network = self.build_module(meta).to(device)
        with torch.no_grad():
            network.names.copy_(names)
        if network.reconstruction is not None and c.rm_standardize:
            network.reconstruction.standardize_with(  # from the real tokens, batch by batch (no copy of the set)
                self._tokens([m[chunk].to(device, torch.float32) for m in data.maps])
                for chunk in torch.arange(len(data)).split(c.batch_size))
        progress = self.progress(train, meta)
        state = progress.peek()
        if state is not None:
            TrainingProgress.load_into(state, {"model": network})
        self.loss_history_ = {"phase1": [], "phase2": []}
        self._phase1(network, data, text, device, progress, state)
        self._phase2(network, data, text, device, progress, state)
        network.eval()
        lambda_sem, lambda_rule = self._lambda(network, data, device, class_names)
        rec_spread, sem_spread = self._score_spreads(network, data, device)
        meta = dataclasses.replace(meta, lambda_sem=lambda_sem, lambda_rule=lambda_rule, rec_spread=rec_spread,
                                   sem_spread=sem_spread)
        report_balance(meta)
        return network, meta

    def _optimizer(self, parts: list[list[nn.Parameter]], decay: list[bool], epochs: int):
        c = self.config
        groups = [{"params": params, "weight_decay": c.weight_decay if d else 0.0} for params, d in zip(parts, decay)]
        return adamw_step_decay(groups, c.lr, c.weight_decay, epochs, c.lr_drop_at, c.lr_drop_factor)

    def _phase1(self, network: LTADNetwork, data: TrainingFeatures, text, device: torch.device,
                progress: TrainingProgress, state: dict[str, Any] | None) -> None:
        """Phase 1 (Eq. 6): learn F_μ, F_σ, D and s_c by reconstructing the real maps from ẑ ⊕ T(s_c)."""
        c = self.config
        if state is not None and state["phase"] == 2:
            self.loss_history_["phase1"] = list(state["losses"]["phase1"])
            return
        network.names.requires_grad_(c.learn_names)
        vae = [p for module in (network.latent, network.decoder) for p in module.parameters()]
        parts, decay = [vae], [True]
        if c.learn_names:  # s_c in its own group without weight decay: decay would pull it off the vocabulary
            parts, decay = [vae, [network.names]], [True, False]
        optimizer, scheduler = self._optimizer(parts, decay, c.epochs_phase1)
        start = 0
        if state is not None:
            TrainingProgress.load_into(state, {"optimizer": optimizer, "scheduler": scheduler})
            start = state["epoch"]
            self.loss_history_ = {k: list(v) for k, v in state["losses"].items()}
        fixed_text = None if c.learn_names else self._class_text(text, network.names).detach()  # (C, d)
        clip_parts = [vae + ([network.names] if c.learn_names else [])]
        bar = tqdm(range(start, c.epochs_phase1), initial=start, total=c.epochs_phase1, desc="ltad phase 1", unit="epoch",
                   disable=not distributed.info().is_main)
        for epoch in bar:
            seed = epoch_seed(c.seed, epoch, phase=1)
            torch.manual_seed(seed)
            batches = EpochBatches(len(data), c.batch_size, seed)  # batch order; batches.noise: ẑ noise
            generator = batches.noise
            network.train()
            total = 0.0
            for batch in batches:
                chosen = batch.indices
                real = [m[chosen].to(device, torch.float32) for m in data.maps]  # [(B, C_l, H_l, W_l)]
                z = data.embeddings[chosen].to(device, torch.float32)  # (B, embed_dim)
                class_idx = data.class_idx[chosen].to(device)  # (B,)
                if fixed_text is None:
                    present, inverse = torch.unique(class_idx, return_inverse=True)
                    class_text = self._class_text(text, network.names[present])[inverse]  # (B, d), grad to s_c
                else:
                    class_text = fixed_text[class_idx]
                synthetic, mean, log_variance = network.synthesize(z, class_text, generator)
                loss = feature_reconstruction_loss(synthetic, real, c.phase1_loss)
                if log_variance is not None:
                    loss = loss + c.kl_weight * kl_to_standard_normal(mean, log_variance, c.phase1_loss)
                optimizer_step(optimizer, loss * batch.weight, clip_parts, c.grad_clip)
                total += loss.item() * len(chosen)
            collapse_check(network, data, fixed_text if fixed_text is not None else self._class_text(text, network.names),
                           device, epoch, seed)
            self._end_epoch(progress, 1, epoch, _epoch_mean(total, len(data)), bar, network, optimizer, scheduler)
        bar.close()
        network.names.requires_grad_(False)

    @staticmethod
    def _class_text(text, names: Tensor) -> Tensor:
        """t_c = T(s_c) (Sec. 5.1): the prompt [CLS] s_c [SEP]; (C, K, token_dim) → (C, d)."""
        return text.encode_soft("", names)

    def _sampling_probabilities(self, class_counts: list[int]) -> Tensor:
        """Per class, the probability that a phase-2 sample uses synthetic features (1 − p_c); (C,).

        Default: 1 − p_c for every class (Sec. 6). Distribution-aware (Tab. 6 "DAS"): proportional
        to 1 / n_c and scaled so that the mean over training samples is still 1 − p_c, capped at 1.
        """
        c = self.config
        counts = torch.tensor(class_counts, dtype=torch.float64)
        synthetic = torch.full_like(counts, 1.0 - c.real_probability)
        if c.distribution_aware_sampling:
            present = counts > 0
            mean_size = counts.sum() / present.sum()
            synthetic = torch.where(present, (1.0 - c.real_probability) * mean_size / counts.clamp_min(1), 0.0)
        if c.augmentation == "none":
            synthetic = torch.zeros_like(counts)
        return synthetic.clamp(0.0, 1.0).float()

    @torch.no_grad()
    def _set_text_classifier(self, network: LTADNetwork, text) -> None:
        """t_{n,c} = T([v_n; s_c]), t_{a,c} = T([v_a; s_c]) (Eq. 4), once, since s_c and T are frozen in phase 2."""
        c = self.config
        if network.semantic is None or network.free_classifier is not None:
            return
        names = network.names.detach()
        normal = torch.stack([text.encode_soft(prompt, names) for prompt in c.normal_prompts])  # (P, C, d)
        anomaly = torch.stack([text.encode_soft(prompt, names) for prompt in c.anomaly_prompts])  # (P, C, d)
        network.text_normal.copy_(combine_prompt_embeddings(normal, c.normalize_text))
        network.text_anomaly.copy_(combine_prompt_embeddings(anomaly, c.normalize_text))

    def _phase2(self, network: LTADNetwork, data: TrainingFeatures, text, device: torch.device,
                progress: TrainingProgress, state: dict[str, Any] | None) -> None:
        """Phase 2 (Eq. 7–8): learn Π and Φ_l on real/synthetic patches and their jittered pseudo-anomalies."""
        c = self.config
        network.names.requires_grad_(False)  # s_c, E and T are frozen in phase 2 (Sec. 5.3)
        for module in (network.latent, network.decoder):
            module.requires_grad_(False)
        with torch.no_grad():
            class_text = self._class_text(text, network.names)  # (C, d), the decoder's conditioning
        self._set_text_classifier(network, text)
        parts: list[list[nn.Parameter]] = []
        if network.reconstruction is not None:
            parts.append(list(network.reconstruction.parameters()))
        if network.semantic is not None:
            semantic = list(network.semantic.parameters())
            parts.append(semantic + ([network.free_classifier] if network.free_classifier is not None else []))
        optimizer, scheduler = self._optimizer(parts, [True] * len(parts), c.epochs_phase2)
        start = 0
        if state is not None and state["phase"] == 2:
            TrainingProgress.load_into(state, {"optimizer": optimizer, "scheduler": scheduler})
            start = state["epoch"]
            self.loss_history_ = {k: list(v) for k, v in state["losses"].items()}
        synthetic_probability = self._sampling_probabilities(
            torch.bincount(data.class_idx, minlength=len(class_text)).tolist())  # (C,)
        bar = tqdm(range(start, c.epochs_phase2), initial=start, total=c.epochs_phase2, desc="ltad phase 2", unit="epoch",
                   disable=not distributed.info().is_main)
        for epoch in bar:
            seed = epoch_seed(c.seed, epoch, phase=2)
            torch.manual_seed(seed)  # dropout in Π
            batches = EpochBatches(len(data), c.batch_size, seed)  # batch order
            generator = batches.noise  # real/synthetic choice, ẑ and jitter noise
            network.train()
            network.latent.eval()
            network.decoder.eval()
            total = 0.0
            for batch in batches:
                chosen = batch.indices
                class_cpu = data.class_idx[chosen]
                normal = self._tokens([m[chosen].to(device, torch.float32) for m in data.maps])  # p^n (B, N, ΣC_l)
                use_synthetic = torch.rand(len(chosen), generator=generator) < synthetic_probability[class_cpu]
                if bool(use_synthetic.any()):
                    picked = use_synthetic.nonzero()[:, 0]
                    z = data.embeddings[chosen[picked]].to(device, torch.float32)
                    with torch.no_grad():
                        maps, _, _ = network.synthesize(z, class_text[class_cpu[picked].to(device)], generator)
                    normal[picked.to(device)] = self._tokens(maps)  # f^syn (Sec. 5.2, "Long-tailed classes")
                anomalous = feature_jitter(normal, c.jitter_scale, c.jitter_prob, generator=generator)  # p^a
                class_idx = class_cpu.to(device)
                loss = torch.zeros((), device=device)
                if network.reconstruction is not None:  # L_rec, Eq. 7
                    loss = loss + reconstruction_score(network.reconstruction(anomalous), normal).mean()
                if network.semantic is not None:  # L_sem, Eq. 8: normal patches 0, pseudo-anomalous 1
                    logits = network.semantic_logits(torch.cat([normal, anomalous]), class_idx.repeat(2), c)  # (2B, N)
                    labels = torch.cat([torch.zeros(len(chosen)), torch.ones(len(chosen))]).to(device)[:, None]
                    loss = loss + F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits))
                optimizer_step(optimizer, loss * batch.weight, parts, c.grad_clip)
                total += loss.item() * len(chosen)
            self._end_epoch(progress, 2, epoch, _epoch_mean(total, len(data)), bar, network, optimizer, scheduler)
        bar.close()

    # ------------------------------------------------------------------ λ of Eq. 5

    @torch.no_grad()
    def _lambda(self, network: LTADNetwork, data: TrainingFeatures, device: torch.device,
                class_names: list[str]) -> tuple[float | None, str]:
        """λ and where it came from: the config, the paper (MVTec/VisA/DAGM classes), or the training-range rule.

        Rule (README): λ = spread(S_rec) = its 99th − 1st percentile over the patches of the first
        training images and of their jittered copies. S_sem spans [0, 1], so both terms of Eq. 5
        then span comparable ranges (Sec. 4: "such that both scores have comparable ranges").
        """
        c = self.config
        if not (c.use_rm and c.use_sad):
            return None, "unused (one score only)"
        if c.lambda_sem is not None:
            return float(c.lambda_sem), "config"
        dataset = paper_dataset(class_names)
        if dataset is not None:
            return PAPER_LAMBDA[dataset], f"paper ({dataset})"
        generator = torch.Generator().manual_seed(epoch_seed(c.seed, 0, phase=3))
        count = min(LAMBDA_SAMPLE_IMAGES, len(data.class_idx))
        scores = []
        for chosen in torch.arange(count).split(self.config.batch_size):
            normal = self._tokens([m[chosen].to(device, torch.float32) for m in data.maps])
            anomalous = feature_jitter(normal, c.jitter_scale, 1.0, generator=generator)
            for tokens in (normal, anomalous):
                scores.append(reconstruction_score(network.reconstruction(tokens), tokens).flatten().cpu())
        # S_sem spans [0, 1] by construction (Eq. 3), so λ·S_sem spans what S_rec spans when λ = spread(S_rec)
        return max(_spread(torch.cat(scores)), 1e-12), "training range"

    @torch.no_grad()
    def _score_spreads(self, network: LTADNetwork, data: TrainingFeatures, device: torch.device
                       ) -> tuple[float | None, float | None]:
        """spread (99th − 1st percentile) of S_rec and of S_sem over the patches of the first clean training images."""
        c = self.config
        count = min(LAMBDA_SAMPLE_IMAGES, len(data))
        rec, sem = [], []
        for chosen in torch.arange(count).split(c.batch_size):
            tokens = self._tokens([m[chosen].to(device, torch.float32) for m in data.maps])
            if network.reconstruction is not None:
                rec.append(reconstruction_score(network.reconstruction(tokens), tokens).flatten().cpu())
            if network.semantic is not None:
                logits = network.semantic_logits(tokens, data.class_idx[chosen].to(device), c)
                sem.append(torch.sigmoid(logits).flatten().cpu())
        return (_spread(torch.cat(rec)) if rec else None), (_spread(torch.cat(sem)) if sem else None)

    @property
    def diagnostics_(self) -> dict[str, Any]:
        """What the runner adds to metrics.json: the scale of the two scores and λ's balance between them."""
        meta = self.meta_
        return {"lambda_sem": meta.lambda_sem, "lambda_rule": meta.lambda_rule, "rec_spread": meta.rec_spread,
                "sem_spread": meta.sem_spread, "lambda_balance": lambda_balance(meta),
                "spread": "99th minus 1st percentile over the patches of up to 256 clean training images"}

    # ------------------------------------------------------------------ training state

    def _end_epoch(self, progress: TrainingProgress, phase: int, epoch: int, loss: float, bar, network: nn.Module,
                   optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Step the schedule, record and show the epoch's loss, and keep the resumable state (model, optimizer,
        scheduler, phase, epoch, losses) in the checkpoint folder, atomically."""
        scheduler.step()
        self.loss_history_[f"phase{phase}"].append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        progress.save({"model": network, "optimizer": optimizer, "scheduler": scheduler}, phase=phase, epoch=epoch + 1,
                      losses={k: list(v) for k, v in self.loss_history_.items()})

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Anomaly maps (B, 224, 224) and image scores (B,) for images (B, 3, 224, 224) in [0, 1] of classes class_idx (B,)."""
        device = self.check_inputs(images, class_idx)
        self.module_.eval()
        tokens = self._test_tokens(images, device)  # (B, N, ΣC_l)
        lambda_sem = self.meta_.lambda_sem or 0.0
        scores = self.module_.patch_scores(tokens, class_idx.to(device), self.config, lambda_sem,
                                           self._test_permutation())  # (B, N)
        # align_corners=True as UniAD's official upsampling (Π and its map are UniAD's)
        return prediction_from_maps(grid_to_image(scores, align_corners=True))

    def _test_tokens(self, images: Tensor, device: torch.device) -> Tensor:
        """Patch tokens of test images, rounded as the cache stores features (so computed exactly like training ones)."""
        features = as_stored(self.image_encoder(device).encode_image(images.to(device)))
        return self._tokens(list(features.maps.values()))  # (B, N, ΣC_l)

    def _test_permutation(self) -> Tensor | None:
        """Tab. 8 expID 8.1: class i uses another class's s_c at test time."""
        return derangement(len(self.meta_.class_names)) if self.config.shuffle_names_at_test else None

    def semantic_scores(self, images: Tensor, class_idx: Tensor) -> Tensor:
        """S_sem (Eq. 3) per patch, (B, N) in [0, 1]: the SAD module's anomaly posterior, for analysis."""
        device = self.check_inputs(images, class_idx)
        if self.module_.semantic is None:
            raise DetectorError("this LTAD was trained without the SAD module (use_sad=False); it has no S_sem")
        with torch.no_grad():
            logits = self.module_.semantic_logits(self._test_tokens(images, device), class_idx.to(device), self.config,
                                                  self._test_permutation())
        return torch.sigmoid(logits).cpu()

    # ------------------------------------------------------------------ persistence and names

    def name_neighbours(self, top: int = 5) -> dict[str, list[list[tuple[str, float]]]]:
        """For each class, the `top` vocabulary tokens nearest (cosine) to each token of its learned s_c.

        Returns: {class name: [[(token, cosine), ...] for each of the K tokens of s_c]}.
        """
        self._check_fitted()
        return describe_names(self.module_.names.detach().cpu(), list(self.meta_.class_names),
                              self.backbone(torch.device("cpu")).text, top)


class LTADWithoutSAD(LTAD):
    """LTAD without the semantic AD module (the paper's "LTAD w/o SAD"): the score is S_rec alone."""

    Config: ClassVar[type] = LTADWithoutSADConfig


# ----------------------------------------------------------------------------- helpers


def initial_names(text, class_names: list[str], mode: str, length: int, seed: int) -> Tensor:
    """The initial pseudo class names s_c (Sec. 6, Tab. 6); (C, K', token_dim).

    "object": K copies of the embedding of "object" ("object object" for K = 2, the paper's default).
    "classname": the tokens of the class name (underscores as spaces); names shorter than the
    longest are followed by "object" tokens, and K' = max(K, longest name) so no name is cut.
    "random": Gaussian, with the standard deviation of the entries of the "object" embedding.
    """
    filler = text.word_embeddings("object").cpu()  # (k, token_dim), one token in BERT vocabularies
    count = len(class_names)
    if mode == "object":
        row = filler.repeat(-(-length // len(filler)), 1)[:length]  # (K, token_dim)
        return row.unsqueeze(0).repeat(count, 1, 1)
    if mode == "classname":
        words = [text.word_embeddings(name.replace("_", " ")).cpu() for name in class_names]
        width = max(length, *(len(w) for w in words))
        pads = [filler[:1].expand(width - len(w), -1) for w in words]
        return torch.stack([torch.cat([w, pad]) for w, pad in zip(words, pads)])
    if mode == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(count, length, filler.shape[-1], generator=generator) * filler.std()
    raise ConfigError(f"name_init must be object, classname or random; got {mode!r}")


def _epoch_mean(total: float, count: int) -> float:
    """An epoch's mean loss per training item from this rank's sum of per-item losses (summed over ranks)."""
    return distributed.all_reduce_sum(torch.tensor([total], dtype=torch.float64)).item() / count


@lru_cache(maxsize=1)
def _paper_class_sets() -> dict[str, frozenset[str]]:
    text = resources.files("ltbench").joinpath("data_files/paper/class_orders.json").read_text()
    orders = json.loads(text)
    return {dataset: frozenset(orders[dataset]) for dataset in PAPER_LAMBDA}


def paper_dataset(class_names: list[str]) -> str | None:
    """"mvtec", "visa" or "dagm" when `class_names` are exactly that paper dataset's classes, else None."""
    wanted = frozenset(class_names)
    for dataset, classes in _paper_class_sets().items():
        if wanted == classes:
            return dataset
    return None


def describe_names(names: Tensor, class_names: list[str], text, top: int) -> dict[str, list[list[tuple[str, float]]]]:
    """Nearest vocabulary tokens (cosine) to each token of each s_c; special tokens ([CLS], [unused0], …) left out.

    Parameters: names: s_c (C, K, token_dim); text: the `TextEncoder` whose vocabulary s_c lives in.
    Returns: {class name: [[(token, cosine), ...] per token of s_c]}.
    """
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    vocabulary = text.model.get_input_embeddings().weight.detach().cpu().float()  # (V, token_dim)
    tokens = text.tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
    usable = torch.tensor([not (t.startswith("[") and t.endswith("]")) for t in tokens])
    indices, similarities = nearest_tokens(names.float(), vocabulary, top, usable)  # (C, K, top) each
    return {
        name: [[(tokens[i], float(s)) for i, s in zip(idx.tolist(), sim.tolist())]
               for idx, sim in zip(indices[c], similarities[c])]
        for c, name in enumerate(class_names)
    }


def read_saved_names(directory: Path) -> tuple[LTADConfig, LTADMeta, Tensor]:
    """The config, meta and learned s_c (C, K, token_dim) of a saved LTAD model, without building any encoder."""
    from safetensors import safe_open

    directory = Path(directory)
    _, weights_path, payload = read_saved_model(LTAD, directory)
    target = payload.get("detector", "") if isinstance(payload, dict) else ""
    if target not in ("ltad_model.detector:LTAD", "ltad_model.detector:LTADWithoutSAD"):
        raise DetectorError(f"{directory} holds a {target or 'non-LTAD'} model; inspect-names needs an LTAD model")
    config_cls = LTADWithoutSADConfig if target.endswith("WithoutSAD") else LTADConfig
    config = make_config(config_cls, payload["config"])
    meta = read_meta(LTADMeta, payload.get("meta"), weights_path.parent / LTAD.CONFIG_FILE)
    with safe_open(str(weights_path), framework="pt") as handle:
        stored = list(handle.keys())  # a safe_open handle supports keys() but not `in`
        if "names" not in stored:
            raise DetectorError(f"{weights_path} has no 'names' tensor; the saved model is corrupt")
        names = handle.get_tensor("names")
    return config, meta, names


def model_directory(path: Path) -> Path:
    """The saved model folder of a run directory (`RUN_DIR/model`), or `path` itself when it is one."""
    path = Path(path)
    if (path / "model" / LTAD.CONFIG_FILE).is_file():
        return path / "model"
    if (path / LTAD.CONFIG_FILE).is_file() and (path / LTAD.WEIGHTS_FILE).is_file():
        return path
    raise DetectorError(f"{path} is neither a run directory (with model/) nor a saved model directory; "
                        "give the folder `ltbench run` printed")


def inspect_names(path: Path, top: int = 5) -> tuple[LTADMeta, dict[str, list[list[tuple[str, float]]]]]:
    """What a trained LTAD calls each class: the vocabulary tokens nearest to each learned s_c token.

    Parameters: path: a run directory or a saved LTAD model directory; top: tokens per s_c token.
    Returns: (meta of the saved model, {class name: [[(token, cosine), ...] per s_c token]}).
    """
    from ltbench.backbones import create

    config, meta, names = read_saved_names(model_directory(path))
    text = create(config.backbone, device="cpu").text
    if names.shape[-1] != text.token_dim:
        raise DetectorError(f"the saved names have {names.shape[-1]}-d tokens but backbone {config.backbone!r} "
                            f"has {text.token_dim}-d word embeddings; is it the backbone the model was trained on?")
    return meta, describe_names(names, list(meta.class_names), text, top)
