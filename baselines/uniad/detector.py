"""The `uniad` detector: a frozen backbone's multi-scale features reconstructed by UniAD's transformer.

fit: encode the training images once through the feature cache (the backbone is frozen, so its
features are the same every epoch), then train the reconstruction transformer on the cached
tokens in memory, saving a resumable training state after every epoch.
predict: anomaly map = L2 norm over channels of (reconstruction − features) on the token grid,
upsampled bilinearly to 224×224; image score = the protocol's (max of the 16×16 average-pooled map).
Defaults are the official ones (zhiyuanyou/UniAD, experiments/MVTec-AD/config.yaml; notes/uniad.md).
`uniad` runs on ImageNet EfficientNet-B7 as in the LTAD paper's comparison (Tab. 3; Tab. 6 expID 6.1);
`uniad_align` is the same model on ALIGN's image encoder (Tab. 6 expID 6.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ltbench import distributed
from ltbench.detector import Prediction, TrainSet, prediction_from_maps
from ltbench.errors import ConfigError
from ltbench.feature_cache import as_stored
from ltbench.feature_detector import FeatureDetector, FeatureMeta, grid_to_image, patch_tokens
from ltbench.reconstruction import ReconstructionTransformer, feature_jitter, transformer_problems
from ltbench.training import EpochBatches, adamw_step_decay, epoch_seed, optimizer_step


@dataclass(frozen=True)
class UniADConfig:
    """Configuration of the UniAD baseline; defaults are the official MVTec-AD config unless noted."""

    # features
    # frozen image encoder, a name for ltbench.backbones.create: ImageNet EfficientNet-B7 as in the LTAD paper's
    # comparison (supplementary: "Both UniAD and LTAD use the architecture of EfficientNetB7"; Tab. 6 expID 6.1 =
    # Tab. 3's UniAD); `uniad_align` is Tab. 6 expID 6.2, the same model on ALIGN's image encoder
    backbone: str = "efficientnet-b7"
    feature_strides: tuple[int, ...] = (2, 4, 8, 16)  # stages whose maps are used (official outlayers 1-4)
    grid: int = 14  # token grid side: 224 input / stride 16 (official feature_size 14×14)
    # antialiased bilinear resize of the maps to the grid; False is the official UpsamplingBilinear2d, which from
    # 112² to 14² reads 2×2 of every 8×8 pixels and never samples about 3/4 of the stride-2 map
    antialias: bool = False
    # reconstruction transformer (official config.yaml, net.reconstruction)
    hidden: int = 256  # hidden_dim
    heads: int = 8  # nhead
    encoder_layers: int = 4  # num_encoder_layers
    decoder_layers: int = 4  # num_decoder_layers
    feedforward: int = 1024  # dim_feedforward
    dropout: float = 0.1  # dropout
    neighbor_size: int = 7  # neighbor_mask.neighbor_size [7, 7], masked in encoder and both decoder attentions
    # the transformer sees standardised tokens (per-channel mean/std of the training tokens; see
    # ltbench.reconstruction): same functions, loss and score, reached in fewer steps; False is the official network
    standardize: bool = False
    jitter_scale: float = 20.0  # feature_jitter.scale
    jitter_prob: float = 1.0  # feature_jitter.prob
    # training (official config.yaml, trainer)
    epochs: int = 1000  # max_epoch
    batch_size: int = 8  # dataset.batch_size
    lr: float = 1e-4  # AdamW lr
    weight_decay: float = 1e-4  # AdamW weight_decay
    lr_drop_at: float = 0.8  # StepLR step_size as a fraction of the epochs (official 800 of 1000)
    lr_drop_factor: float = 0.1  # StepLR gamma
    grad_clip: float = 0.1  # clip_max_norm on the global gradient norm
    seed: int = 133  # random_seed: model init, batch order, jitter and dropout

    def __post_init__(self) -> None:
        # JSON and --set give lists; keep the frozen config hashable
        object.__setattr__(self, "feature_strides", tuple(int(s) for s in self.feature_strides))
        problems = []
        if not self.backbone:
            problems.append("backbone must name a backbone (align, lite, tiny-align, align:/local/dir)")
        if not self.feature_strides:
            problems.append("feature_strides must list at least one stride, e.g. [2, 4, 8, 16]")
        if self.grid < 1:
            problems.append(f"grid must be >= 1, got {self.grid}")
        problems += transformer_problems(self.hidden, self.heads, self.encoder_layers, self.decoder_layers,
                                         self.feedforward, self.dropout, self.neighbor_size, self.grid)
        if self.jitter_scale < 0 or not 0.0 <= self.jitter_prob <= 1.0:
            problems.append("jitter_scale must be >= 0 and jitter_prob in [0, 1]")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            problems.append("lr and grad_clip must be > 0, weight_decay >= 0")
        if not 0.0 < self.lr_drop_at <= 1.0 or not 0.0 < self.lr_drop_factor <= 1.0:
            problems.append("lr_drop_at and lr_drop_factor must be in (0, 1]")
        if problems:
            raise ConfigError("invalid UniAD config: " + "; ".join(problems))


@dataclass(frozen=True)
class UniADMeta(FeatureMeta):
    """What UniAD learns about its data in `fit` (saved in config.json)."""

    feature_channels: int  # channels of a token: the sum over the feature layers
    train_images: int  # training images seen (over all ranks)


class UniAD(FeatureDetector):
    """UniAD-style unified reconstruction baseline (You et al., NeurIPS 2022)."""

    Config: ClassVar[type] = UniADConfig
    Meta: ClassVar[type] = UniADMeta
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the official schedule on the paper's comparison backbone (ImageNet EfficientNet-B7)
        "paper": {"backbone": "efficientnet-b7", "epochs": 1000},
        # a CPU run on synth/* in minutes: the offline backbone and LTAD's quick Π size (the full-size
        # transformer costs ~0.5 CPU-s per image per epoch); a larger step for the few epochs (lr 5e-3 diverged)
        "quick": {"backbone": "lite", "hidden": 64, "heads": 4, "encoder_layers": 2, "decoder_layers": 2,
                  "feedforward": 256, "dropout": 0.0, "epochs": 8, "lr": 2e-3, "standardize": True},
    }

    def build_module(self, meta: UniADMeta) -> nn.Module:
        """The reconstruction transformer sized for `meta.feature_channels`."""
        c = self.config
        return ReconstructionTransformer(
            meta.feature_channels, grid=c.grid, hidden=c.hidden, heads=c.heads,
            encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
            feedforward=c.feedforward, dropout=c.dropout, neighbor_size=c.neighbor_size,
        )

    def _feature_layers(self, encoder) -> list[str]:
        """The deepest layer of each requested stride (official: the last block of each stage)."""
        layers = []
        for stride in self.config.feature_strides:
            matching = [name for name in encoder.layer_names if encoder.strides[name] == stride]
            if not matching:
                available = sorted(set(encoder.strides.values()))
                raise ConfigError(
                    f"backbone {encoder.name!r} has no layer with stride {stride}; "
                    f"available strides {available}: set feature_strides to some of them"
                )
            layers.append(matching[-1])
        return layers

    def _tokens(self, maps: list[Tensor]) -> Tensor:
        """Float16-rounded maps → (B, N, C) float32 tokens on the grid, rounded to float16 as the cache stores them.

        Fresh (test) features and cached (training) features then go through exactly the same arithmetic.
        """
        return patch_tokens(maps, self.config.grid, antialias=self.config.antialias).half().float()

    # ------------------------------------------------------------------ training

    def learn(self, train: TrainSet, device: torch.device) -> tuple[nn.Module, UniADMeta]:
        """Train the reconstruction transformer on the normal images of `train`."""
        c = self.config
        encoder = self.image_encoder(device)
        layers = self._feature_layers(encoder)
        data = self.encode_training_set(train, layers, transform=self._tokens)
        tokens = data.maps[0]  # (M, N, C) float16, exact: the tokens are float16-rounded
        meta = UniADMeta(backbone=c.backbone, backbone_digest=encoder.digest, feature_layers=tuple(layers),
                         class_names=tuple(train.class_names), feature_channels=int(tokens.shape[-1]),
                         train_images=int(tokens.shape[0]))
        torch.manual_seed(c.seed)
        module = self.build_module(meta).to(device)
        if c.standardize:
            module.standardize_with(tokens.split(256))  # (≤256, N, C) float16 batches of the training tokens
        self.loss_history_ = self._train(module, tokens, device, self.progress(train, meta))
        return module, meta

    def _train(self, module: nn.Module, tokens: Tensor, device: torch.device, progress) -> list[float]:
        """The training loop on cached tokens; resumes from the checkpoint folder when it holds a state. Returns epoch losses."""
        c = self.config
        optimizer, scheduler = adamw_step_decay(module.parameters(), c.lr, c.weight_decay, c.epochs,
                                                c.lr_drop_at, c.lr_drop_factor)
        parts = {"model": module, "optimizer": optimizer, "scheduler": scheduler}
        saved = progress.restore(parts)
        losses = [float(x) for x in saved["epoch_losses"]] if saved else []
        start = len(losses)
        bar = tqdm(range(start, c.epochs), initial=start, total=c.epochs, desc="uniad train", unit="epoch",
                   disable=not distributed.info().is_main)
        for epoch in bar:
            module.train()
            seed = epoch_seed(c.seed, epoch)
            torch.manual_seed(seed)  # dropout
            batches = EpochBatches(len(tokens), c.batch_size, seed)  # batch order; batches.noise: jitter
            total = 0.0
            for batch in batches:
                features = tokens[batch.indices].to(device, torch.float32)  # (B, N, C)
                jittered = feature_jitter(features, c.jitter_scale, c.jitter_prob, generator=batches.noise)
                loss = F.mse_loss(module(jittered), features)
                optimizer_step(optimizer, loss * batch.weight, [list(module.parameters())], c.grad_clip)
                total += loss.item() * len(features)
            scheduler.step()
            losses.append(distributed.all_reduce_sum(torch.tensor([total], dtype=torch.float64)).item() / len(tokens))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            progress.save(parts, epoch_losses=list(losses))
        bar.close()
        return losses

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Anomaly maps (B, 224, 224) and the protocol's image scores (B,) for images (B, 3, 224, 224) in [0, 1].

        class_idx is only checked: one unified model serves every class.
        """
        device = self.check_inputs(images, class_idx)
        features = as_stored(self.image_encoder(device).encode_image(images.to(device)))
        tokens = self._tokens([features.maps[name] for name in self.meta_.feature_layers])  # (B, N, C)
        return prediction_from_maps(self.anomaly_maps(tokens))

    @torch.no_grad()
    def anomaly_maps(self, tokens: Tensor) -> Tensor:
        """(B, N, C) feature tokens → (B, 224, 224) float32 CPU maps: ‖reconstruction − features‖₂ per token, upsampled."""
        self.module_.eval()
        reconstruction = self.module_(tokens)  # (B, N, C)
        distance = (reconstruction - tokens).pow(2).sum(-1).sqrt()  # (B, N)
        return grid_to_image(distance, align_corners=True)  # as the official nn.UpsamplingBilinear2d


@dataclass(frozen=True)
class UniADAlignConfig(UniADConfig):
    """UniAD on ALIGN's image encoder: the LTAD paper's Tab. 6 expID 6.2 ("w/ ALIGN", same model)."""

    backbone: str = "align"  # the only difference from UniADConfig


class UniADAlign(UniAD):
    """UniAD on ALIGN features (Tab. 6 expID 6.2), registered as `uniad_align`."""

    Config: ClassVar[type] = UniADAlignConfig
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {**UniAD.PRESETS, "paper": {"backbone": "align", "epochs": 1000}}
