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

import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from baselines.uniad.model import feature_jitter
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
    IMAGE_SIZE,
    Prediction,
    TorchDetector,
    TrainSet,
    check_backbone_digest,
    config_to_dict,
    load_training_state,
    make_config,
    read_saved_model,
    save_training_state,
)
from ltbench.errors import ConfigError, DetectorError
from ltbench.feature_cache import FeatureCache, as_stored

ENCODE_BATCH = 32  # images per backbone call when caching the training features
LAMBDA_SAMPLE_IMAGES = 256  # training images the λ rule looks at (the first ones, in split order)
# λ of Eq. 5 in the paper (Sec. 6, "Training details"), keyed by the paper dataset whose classes they are
PAPER_LAMBDA = {"mvtec": 500.0, "visa": 400.0, "dagm": 300.0}
META_KEYS = (
    "backbone", "backbone_digest", "feature_layers", "feature_channels", "map_sizes", "embed_dim",
    "text_dim", "token_dim", "class_names", "class_counts", "name_length", "grid", "lambda_sem", "lambda_rule",
)


@dataclass(frozen=True)
class LTADConfig:
    """Configuration of LTAD; defaults are the paper's (Sec. 6, App. A.2) unless a comment says otherwise."""

    # frozen encoders and features
    backbone: str = "align"  # E and T (Sec. 6: ALIGN; its layers {3, 10, 17, 37} are picked by ltbench.backbones)
    grid: int = 14  # patch-token grid side, stride 16 at 224 (Π is UniAD's transformer on UniAD's 14×14 grid)
    # pseudo class names s_c (Sec. 4, 5.1)
    name_length: int = 2  # K, tokens per s_c (Sec. 6, Fig. 6)
    name_init: Literal["object", "classname", "random"] = "object"  # init of s_c (Sec. 6; Tab. 6 expIDs 6.5–6.8)
    learn_names: bool = True  # learn s_c in phase 1 (Tab. 6: "use learned s_c")
    # phase 1: class-sensitive augmentation (Sec. 5.1, Eq. 6)
    augmentation: Literal["vae", "ae", "none"] = "vae"  # phase-2 synthetic features from the VAE, a plain AE, or none (Tab. 6)
    latent_dim: int | None = None  # size of ẑ; None = size of z (not given in the paper)
    kl_weight: float = 1.0  # weight of the KL term (Eq. 6 weighs it 1; both terms are per-element means)
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
                   "layer_pooling": ("max", "mean", "concat")}
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
        if not (self.use_rm or self.use_sad):
            problems.append("use_rm and use_sad cannot both be False: nothing would score anomalies")
        if self.rm_hidden < 2 or self.rm_hidden % 2 or self.rm_heads < 1 or self.rm_hidden % self.rm_heads:
            problems.append(f"rm_hidden ({self.rm_hidden}) must be even and divisible by rm_heads ({self.rm_heads})")
        if self.rm_encoder_layers < 0 or self.rm_decoder_layers < 1 or self.rm_feedforward < 1:
            problems.append("rm_encoder_layers must be >= 0, rm_decoder_layers and rm_feedforward >= 1")
        if not 0.0 <= self.rm_dropout < 1.0:
            problems.append(f"rm_dropout must be in [0, 1), got {self.rm_dropout}")
        if self.rm_neighbor_size < 0 or (self.rm_neighbor_size and (self.rm_neighbor_size % 2 == 0
                                                                     or self.rm_neighbor_size >= self.grid)):
            problems.append(f"rm_neighbor_size must be 0 (no mask) or odd and < grid ({self.grid})")
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


@dataclass
class TrainingFeatures:
    """The frozen encoder's output for the training set, held on the CPU in float16."""

    maps: list[Tensor]  # per layer (M, C_l, H_l, W_l), shallow to deep
    embeddings: Tensor  # (M, embed_dim), z
    class_idx: Tensor  # (M,) int64


class LTAD(TorchDetector):
    """LTAD (Ho, Peng, Vasconcelos, CVPR 2024): reconstruction + semantic AD with learned pseudo class names."""

    Config: ClassVar[type] = LTADConfig
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the paper's schedule (Sec. 6) on ALIGN
        "paper": {"backbone": "align", "epochs_phase1": 100, "epochs_phase2": 500},
        # a CPU run on synth/* in about 5 minutes (timings in ltad_model/README.md): few epochs and a
        # smaller Π without dropout, since UniAD's full-size Π alone costs ~0.6 CPU-s per image per epoch
        "quick": {"backbone": "lite", "epochs_phase1": 2, "epochs_phase2": 5, "lr": 5e-4, "rm_hidden": 64,
                  "rm_heads": 4, "rm_encoder_layers": 2, "rm_decoder_layers": 2, "rm_feedforward": 256,
                  "rm_dropout": 0.0},
    }

    def __init__(self, config: LTADConfig | None = None):
        super().__init__(config)
        self._backbone = None  # frozen E and T, created on first use (not learned, not saved)

    # ------------------------------------------------------------------ module and features

    def build_module(self, meta: dict[str, Any]) -> nn.Module:
        """The learnable network sized by `meta` (see META_KEYS)."""
        if set(meta) != set(META_KEYS):
            raise DetectorError(f"LTAD meta must hold exactly {sorted(META_KEYS)}; found {sorted(meta)}")
        return LTADNetwork(self._layout(meta), self.config)

    def _layout(self, meta: dict[str, Any]) -> FeatureLayout:
        return FeatureLayout(
            channels=tuple(meta["feature_channels"]), map_sizes=tuple(tuple(s) for s in meta["map_sizes"]),
            embed_dim=meta["embed_dim"], text_dim=meta["text_dim"], token_dim=meta["token_dim"],
            num_classes=len(meta["class_names"]), name_length=meta["name_length"], grid=meta["grid"],
        )

    def _backbone_on(self, device: torch.device):
        from ltbench.backbones import create

        if self._backbone is None or not _same_device(self._backbone.image.device, torch.device(device)):
            self._backbone = create(self.config.backbone, device=device)
        return self._backbone

    def _tokens(self, maps: list[Tensor]) -> Tensor:
        """The L−1 maps → patch tokens p (B, N, ΣC_l) on the grid, in layer order (N = grid², row-major)."""
        from ltbench.backbones import to_patch_tokens

        named = OrderedDict((str(index), m) for index, m in enumerate(maps))
        grid_features = to_patch_tokens(named, grid=self.config.grid)  # (B, ΣC_l, g, g)
        return grid_features.flatten(2).transpose(1, 2).contiguous()  # (B, N, ΣC_l)

    def _training_features(self, train: TrainSet, encoder) -> TrainingFeatures:
        """Encode every training image once through the feature cache."""
        cache = FeatureCache()
        maps: list[list[Tensor]] = []
        embeddings, labels = [], []
        bar = tqdm(total=len(train), desc="ltad features", unit="img", leave=False, disable=not distributed.info().is_main)
        for images, class_idx in train.batches(ENCODE_BATCH, shuffle=False):
            features = cache.encode(encoder, images.to(train.device))
            maps.append([m.to("cpu", torch.float16) for m in features.maps.values()])
            embeddings.append(features.embedding.to("cpu", torch.float16))
            labels.append(class_idx.to("cpu", torch.int64))
            bar.update(len(images))
        bar.close()
        if not labels:
            raise DetectorError("the training set is empty; LTAD needs at least one normal image")
        per_layer = [torch.cat(layer) for layer in zip(*maps)]
        return TrainingFeatures(per_layer, torch.cat(embeddings), torch.cat(labels))

    # ------------------------------------------------------------------ training

    def fit(self, train: TrainSet) -> LTAD:
        """Run phase 1 and phase 2 on the normal images of `train` (resuming from its checkpoint folder); returns self."""
        c = self.config
        device = torch.device(train.device)
        class_names = list(train.class_names)
        if c.shuffle_names_at_test and len(class_names) < 2:
            raise DetectorError("shuffle_names_at_test needs at least 2 classes to give each class another's name")
        backbone = self._backbone_on(device)
        encoder, text = backbone.image, backbone.text
        data = self._training_features(train, encoder)
        if int(data.class_idx.min()) < 0 or int(data.class_idx.max()) >= len(class_names):
            raise DetectorError(f"training class_idx must lie in [0, {len(class_names)}); the TrainSet is inconsistent")
        names = initial_names(text, class_names, c.name_init, c.name_length, c.seed)  # (C, K, token_dim)
        meta = {
            "backbone": c.backbone, "backbone_digest": encoder.digest, "feature_layers": list(encoder.layer_names),
            "feature_channels": [int(m.shape[1]) for m in data.maps],
            "map_sizes": [[int(m.shape[2]), int(m.shape[3])] for m in data.maps],
            "embed_dim": int(data.embeddings.shape[1]), "text_dim": int(text.dim), "token_dim": int(text.token_dim),
            "class_names": class_names,
            # over all ranks when training is distributed (each rank holds a shard of the training set)
            "class_counts": distributed.all_reduce_sum(torch.bincount(data.class_idx, minlength=len(class_names))).tolist(),
            "name_length": int(names.shape[1]), "grid": c.grid, "lambda_sem": None, "lambda_rule": None,
        }
        checkpoint_dir = Path(train.checkpoint_dir)
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seed locally, leave the caller's RNG as it was
            torch.manual_seed(c.seed)
            network = self.build_module(meta).to(device)
            with torch.no_grad():
                network.names.copy_(names)
            state = load_training_state(checkpoint_dir)
            if state is not None:
                self._restore_network(state, network, meta, checkpoint_dir)
            self.loss_history_ = {"phase1": [], "phase2": []}
            self._phase1(network, data, text, device, checkpoint_dir, meta, state)
            self._phase2(network, data, text, device, checkpoint_dir, meta, state)
            network.eval()
            # rank 0's λ everywhere, so that every rank predicts with the saved model's λ
            meta["lambda_sem"], meta["lambda_rule"] = distributed.broadcast(
                self._lambda(network, data, device, class_names))
        self.module_, self.meta_ = network, meta
        return self

    def _epoch_seed(self, phase: int, epoch: int) -> int:
        """Each epoch's own seed: a resumed run replays exactly what an uninterrupted one draws."""
        return (self.config.seed * 1_000_003 + phase * 100_003 + epoch) % (2**63)

    def _batches(self, count: int, generator: torch.Generator) -> list[Tensor]:
        order = torch.randperm(count, generator=generator)
        return list(order.split(self.config.batch_size))

    def _optimizer(self, parts: list[list[nn.Parameter]], decay: list[bool], epochs: int):
        c = self.config
        groups = [{"params": params, "weight_decay": c.weight_decay if d else 0.0} for params, d in zip(parts, decay)]
        optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.999))
        step = max(1, round(c.lr_drop_at * epochs))
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=c.lr_drop_factor)

    def _step(self, optimizer: torch.optim.Optimizer, loss: Tensor, parts: list[list[nn.Parameter]]) -> None:
        """One optimiser step: backward, gradients averaged over ranks (no-op in one process), per-part clipping."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(p for params in parts for p in params)
        self._clip(parts)
        optimizer.step()

    def _clip(self, parts: list[list[nn.Parameter]]) -> None:
        """Clip each learned part on its own, so parts trained by separate losses stay independent."""
        if self.config.grad_clip is not None:
            for params in parts:
                nn.utils.clip_grad_norm_(params, self.config.grad_clip)

    def _phase1(self, network: LTADNetwork, data: TrainingFeatures, text, device: torch.device,
                checkpoint_dir: Path, meta: dict[str, Any], state: dict[str, Any] | None) -> None:
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
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = state["epoch"]
            self.loss_history_ = {k: list(v) for k, v in state["losses"].items()}
        fixed_text = None if c.learn_names else self._class_text(text, network.names).detach()  # (C, d)
        clip_parts = [vae + ([network.names] if c.learn_names else [])]
        bar = tqdm(range(start, c.epochs_phase1), initial=start, total=c.epochs_phase1, desc="ltad phase 1", unit="epoch",
                   disable=not distributed.info().is_main)
        for epoch in bar:
            seed = self._epoch_seed(1, epoch)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(_rank_seed(seed))  # batch order and ẑ noise
            network.train()
            total = 0.0
            for chosen in self._batches(len(data.class_idx), generator):
                real = [m[chosen].to(device, torch.float32) for m in data.maps]  # [(B, C_l, H_l, W_l)]
                z = data.embeddings[chosen].to(device, torch.float32)  # (B, embed_dim)
                class_idx = data.class_idx[chosen].to(device)  # (B,)
                if fixed_text is None:
                    present, inverse = torch.unique(class_idx, return_inverse=True)
                    class_text = self._class_text(text, network.names[present])[inverse]  # (B, d), grad to s_c
                else:
                    class_text = fixed_text[class_idx]
                synthetic, mean, log_variance = network.synthesize(z, class_text, generator)
                loss = feature_reconstruction_loss(synthetic, real)
                if log_variance is not None:
                    loss = loss + c.kl_weight * kl_to_standard_normal(mean, log_variance)
                self._step(optimizer, loss, clip_parts)
                total += loss.item() * len(chosen)
            scheduler.step()
            self.loss_history_["phase1"].append(total / len(data.class_idx))
            bar.set_postfix(loss=f"{self.loss_history_['phase1'][-1]:.4f}")
            self._save_state(checkpoint_dir, 1, epoch + 1, network, optimizer, scheduler, meta)
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
                checkpoint_dir: Path, meta: dict[str, Any], state: dict[str, Any] | None) -> None:
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
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = state["epoch"]
            self.loss_history_ = {k: list(v) for k, v in state["losses"].items()}
        synthetic_probability = self._sampling_probabilities(meta["class_counts"])  # (C,)
        bar = tqdm(range(start, c.epochs_phase2), initial=start, total=c.epochs_phase2, desc="ltad phase 2", unit="epoch",
                   disable=not distributed.info().is_main)
        for epoch in bar:
            seed = self._epoch_seed(2, epoch)
            torch.manual_seed(seed)  # dropout in Π
            # batch order, real/synthetic choice, ẑ and jitter noise
            generator = torch.Generator().manual_seed(_rank_seed(seed))
            network.train()
            network.latent.eval()
            network.decoder.eval()
            total = 0.0
            for chosen in self._batches(len(data.class_idx), generator):
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
                self._step(optimizer, loss, parts)
                total += loss.item() * len(chosen)
            scheduler.step()
            self.loss_history_["phase2"].append(total / len(data.class_idx))
            bar.set_postfix(loss=f"{self.loss_history_['phase2'][-1]:.4f}")
            self._save_state(checkpoint_dir, 2, epoch + 1, network, optimizer, scheduler, meta)
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
        generator = torch.Generator().manual_seed(self._epoch_seed(3, 0))
        count = min(LAMBDA_SAMPLE_IMAGES, len(data.class_idx))
        scores = []
        for chosen in torch.arange(count).split(self.config.batch_size):
            normal = self._tokens([m[chosen].to(device, torch.float32) for m in data.maps])
            anomalous = feature_jitter(normal, c.jitter_scale, 1.0, generator=generator)
            for tokens in (normal, anomalous):
                scores.append(reconstruction_score(network.reconstruction(tokens), tokens).flatten().cpu())
        # S_sem spans [0, 1] by construction (Eq. 3), so λ·S_sem spans what S_rec spans when λ = spread(S_rec)
        return max(_spread(torch.cat(scores)), 1e-12), "training range"

    # ------------------------------------------------------------------ training state

    def _training_identity(self, meta: dict[str, Any]) -> str:
        """What a checkpoint must agree on to be resumed: the config and the facts about the data, as JSON."""
        return json.dumps({"config": config_to_dict(self.config), "meta": meta}, sort_keys=True)

    def _save_state(self, checkpoint_dir: Path, phase: int, epoch: int, network: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, meta: dict[str, Any]) -> None:
        """Keep model, optimizer, scheduler, phase, epoch and losses in `checkpoint_dir`, atomically."""
        save_training_state(checkpoint_dir, {
            "ltad": self._training_identity(meta), "phase": phase, "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "losses": {k: list(v) for k, v in self.loss_history_.items()},
        })

    def _restore_network(self, state: Any, network: nn.Module, meta: dict[str, Any], checkpoint_dir: Path) -> None:
        if not isinstance(state, dict) or state.get("ltad") != self._training_identity(meta):
            raise DetectorError(
                f"the training state in {checkpoint_dir} was written by another model, config or split; "
                "resume with the same config and split, or use a fresh checkpoint folder"
            )
        network.load_state_dict(state["model"], strict=True)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Anomaly maps (B, 224, 224) and image scores (B,) for images (B, 3, 224, 224) in [0, 1] of classes class_idx (B,)."""
        self._check_fitted()
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise DetectorError(f"LTAD.predict expects images (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
        if class_idx.shape != images.shape[:1]:
            raise DetectorError(f"class_idx must have shape ({len(images)},), got {tuple(class_idx.shape)}")
        num_classes = len(self.meta_["class_names"])
        if len(class_idx) and (int(class_idx.min()) < 0 or int(class_idx.max()) >= num_classes):
            raise DetectorError(f"class_idx must lie in [0, {num_classes}) (the training split's classes)")
        device = next(self.module_.parameters()).device
        encoder = self._backbone_on(device).image
        self.module_.eval()
        # rounded as the cache stores features, so test features are computed exactly like training ones
        features = as_stored(encoder.encode_image(images.to(device)))
        tokens = self._tokens(list(features.maps.values()))  # (B, N, ΣC_l)
        permutation = derangement(num_classes) if self.config.shuffle_names_at_test else None
        lambda_sem = self.meta_["lambda_sem"] or 0.0
        scores = self.module_.patch_scores(tokens, class_idx.to(device), self.config, lambda_sem, permutation)  # (B, N)
        grid = self.config.grid
        small = scores.view(-1, 1, grid, grid)  # (B, 1, g, g)
        # align_corners=True as UniAD's official upsampling (Π and its map are UniAD's)
        anomaly_maps = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True)[:, 0]
        anomaly_maps = anomaly_maps.float().cpu()  # (B, 224, 224)
        return Prediction(image_scores=image_score_from_map(anomaly_maps), anomaly_maps=anomaly_maps)

    def semantic_scores(self, images: Tensor, class_idx: Tensor) -> Tensor:
        """S_sem (Eq. 3) per patch, (B, N) in [0, 1]: the SAD module's anomaly posterior, for analysis."""
        self._check_fitted()
        if self.module_.semantic is None:
            raise DetectorError("this LTAD was trained without the SAD module (use_sad=False); it has no S_sem")
        device = next(self.module_.parameters()).device
        with torch.no_grad():
            features = as_stored(self._backbone_on(device).image.encode_image(images.to(device)))
            maps = list(features.maps.values())
            permutation = derangement(len(self.meta_["class_names"])) if self.config.shuffle_names_at_test else None
            logits = self.module_.semantic_logits(self._tokens(maps), class_idx.to(device), self.config, permutation)
        return torch.sigmoid(logits).cpu()

    # ------------------------------------------------------------------ persistence and names

    @classmethod
    def load(cls, directory: Path) -> LTAD:
        """Rebuild a saved LTAD; the backbone must be the one it was trained on (same weights digest)."""
        detector = super().load(directory)
        encoder = detector._backbone_on(torch.device("cpu")).image
        check_backbone_digest(detector.meta_, detector.config.backbone, encoder.digest, directory)
        return detector

    def name_neighbours(self, top: int = 5) -> dict[str, list[list[tuple[str, float]]]]:
        """For each class, the `top` vocabulary tokens nearest (cosine) to each token of its learned s_c.

        Returns: {class name: [[(token, cosine), ...] for each of the K tokens of s_c]}.
        """
        self._check_fitted()
        return describe_names(self.module_.names.detach().cpu(), self.meta_["class_names"],
                              self._backbone_on(torch.device("cpu")).text, top)


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


def _rank_seed(seed: int) -> int:
    """`seed` in one process; under torchrun each rank draws its own noise for its own shard."""
    return (seed + 7_919 * distributed.info().rank) % (2**63)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same ("cuda" and "cuda:0" are, when device 0 is the current one)."""
    def index(d: torch.device) -> int:
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)

    return a.type == b.type and index(a) == index(b)


def _spread(values: Tensor) -> float:
    """99th minus 1st percentile of a 1-D tensor."""
    values = values.float()
    if len(values) > 1_000_000:  # torch.quantile's input limit; an even subsample keeps it exact enough
        values = values[:: len(values) // 1_000_000 + 1]
    return float(torch.quantile(values, 0.99) - torch.quantile(values, 0.01))


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


def read_saved_names(directory: Path) -> tuple[LTADConfig, dict[str, Any], Tensor]:
    """The config, meta and learned s_c (C, K, token_dim) of a saved LTAD model, without building any encoder."""
    from safetensors import safe_open

    directory = Path(directory)
    _, weights_path, payload = read_saved_model(LTAD, directory)
    target = payload.get("detector", "") if isinstance(payload, dict) else ""
    if target not in ("ltad_model.detector:LTAD", "ltad_model.detector:LTADWithoutSAD"):
        raise DetectorError(f"{directory} holds a {target or 'non-LTAD'} model; inspect-names needs an LTAD model")
    config_cls = LTADWithoutSADConfig if target.endswith("WithoutSAD") else LTADConfig
    config = make_config(config_cls, payload["config"])
    with safe_open(str(weights_path), framework="pt") as handle:
        stored = list(handle.keys())  # a safe_open handle supports keys() but not `in`
        if "names" not in stored:
            raise DetectorError(f"{weights_path} has no 'names' tensor; the saved model is corrupt")
        names = handle.get_tensor("names")
    return config, payload["meta"], names


def model_directory(path: Path) -> Path:
    """The saved model folder of a run directory (`RUN_DIR/model`), or `path` itself when it is one."""
    path = Path(path)
    if (path / "model" / LTAD.CONFIG_FILE).is_file():
        return path / "model"
    if (path / LTAD.CONFIG_FILE).is_file() and (path / LTAD.WEIGHTS_FILE).is_file():
        return path
    raise DetectorError(f"{path} is neither a run directory (with model/) nor a saved model directory; "
                        "give the folder `ltbench run` printed")


def inspect_names(path: Path, top: int = 5) -> tuple[dict[str, Any], dict[str, list[list[tuple[str, float]]]]]:
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
    return meta, describe_names(names, meta["class_names"], text, top)


def image_score_from_map(maps: Tensor) -> Tensor:
    """Image score per the evaluation protocol: max of the 16×16 average-pooled map (stride 1); (B,) float32."""
    from ltbench.metrics import image_score_from_map as protocol_score

    return torch.from_numpy(protocol_score(maps)).float()
