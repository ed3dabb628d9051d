"""The `uniad` detector: a frozen backbone's multi-scale features reconstructed by UniAD's transformer.

fit: encode the training images once through the feature cache (the backbone is frozen, so its
features are the same every epoch), then train the reconstruction transformer on the cached
tokens in memory, saving a resumable training state after every epoch.
predict: anomaly map = L2 norm over channels of (reconstruction − features) on the token grid,
upsampled bilinearly to 224×224; image score = max of the 16×16 average-pooled map.
Defaults are the official ones (zhiyuanyou/UniAD, experiments/MVTec-AD/config.yaml; notes/uniad.md).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from baselines.uniad.model import ReconstructionTransformer, feature_jitter
from ltbench import distributed
from ltbench.backbones import Features, ImageEncoder, create, to_patch_tokens
from ltbench.detector import (
    IMAGE_SIZE,
    Prediction,
    TorchDetector,
    TrainSet,
    check_backbone_digest,
    config_to_dict,
    load_training_state,
    save_training_state,
)
from ltbench.errors import ConfigError, DetectorError
from ltbench.feature_cache import FeatureCache, as_stored
from ltbench.metrics import image_score_from_map

ENCODE_BATCH = 32  # images per backbone call when caching the training features
META_KEYS = ("backbone", "backbone_digest", "feature_layers", "feature_channels", "class_names", "train_images")


@dataclass(frozen=True)
class UniADConfig:
    """Configuration of the UniAD baseline; defaults are the official MVTec-AD config unless noted."""

    # features
    backbone: str = "align"  # frozen image encoder, a name for ltbench.backbones.create (LTBench default)
    feature_strides: tuple[int, ...] = (2, 4, 8, 16)  # stages whose maps are used (official outlayers 1-4)
    grid: int = 14  # token grid side: 224 input / stride 16 (official feature_size 14×14)
    # reconstruction transformer (official config.yaml, net.reconstruction)
    hidden: int = 256  # hidden_dim
    heads: int = 8  # nhead
    encoder_layers: int = 4  # num_encoder_layers
    decoder_layers: int = 4  # num_decoder_layers
    feedforward: int = 1024  # dim_feedforward
    dropout: float = 0.1  # dropout
    neighbor_size: int = 7  # neighbor_mask.neighbor_size [7, 7], masked in encoder and both decoder attentions
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
        if self.hidden < 2 or self.hidden % 2 or self.heads < 1 or self.hidden % self.heads:
            problems.append(f"hidden ({self.hidden}) must be even and divisible by heads ({self.heads})")
        if self.encoder_layers < 0 or self.decoder_layers < 1:
            problems.append("encoder_layers must be >= 0 and decoder_layers >= 1")
        if self.feedforward < 1:
            problems.append(f"feedforward must be >= 1, got {self.feedforward}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.neighbor_size < 0 or (self.neighbor_size and (self.neighbor_size % 2 == 0 or self.neighbor_size >= self.grid)):
            problems.append(f"neighbor_size must be 0 (no mask) or odd and < grid ({self.grid}), got {self.neighbor_size}")
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


class UniAD(TorchDetector):
    """UniAD-style unified reconstruction baseline (You et al., NeurIPS 2022)."""

    Config: ClassVar[type] = UniADConfig
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the official schedule on LTBench's default backbone
        "paper": {"backbone": "align", "epochs": 1000},
        # a CPU run on synth/* in minutes: the offline backbone and LTAD's quick Π size (the full-size
        # transformer costs ~0.5 CPU-s per image per epoch); a larger step for the few epochs (lr 5e-3 diverged)
        "quick": {"backbone": "lite", "hidden": 64, "heads": 4, "encoder_layers": 2, "decoder_layers": 2,
                  "feedforward": 256, "dropout": 0.0, "epochs": 8, "lr": 2e-3},
    }

    def __init__(self, config: UniADConfig | None = None):
        super().__init__(config)
        self._encoder = None  # frozen image encoder, created on first use (not learned, not saved)

    # ------------------------------------------------------------------ module and features

    def build_module(self, meta: dict[str, Any]) -> nn.Module:
        """The reconstruction transformer sized for `meta["feature_channels"]`."""
        if set(meta) != set(META_KEYS):
            raise DetectorError(f"UniAD meta must hold exactly {sorted(META_KEYS)}; found {sorted(meta)}")
        c = self.config
        return ReconstructionTransformer(
            meta["feature_channels"], grid=c.grid, hidden=c.hidden, heads=c.heads,
            encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
            feedforward=c.feedforward, dropout=c.dropout, neighbor_size=c.neighbor_size,
        )

    def _image_encoder(self, device: torch.device) -> ImageEncoder:
        if self._encoder is None:
            self._encoder = create(self.config.backbone, device=device).image
        return self._encoder

    def _feature_layers(self, encoder: ImageEncoder) -> list[str]:
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

    def _tokens(self, features: Features, layers: list[str]) -> Tensor:
        """Backbone features → (B, N, C) float32 tokens on the grid, in layer order.

        Maps and tokens are rounded to float16 as the feature cache stores them, so that fresh
        (test) features and cached (training) features go through exactly the same arithmetic.
        """
        stored = as_stored(features)
        maps = OrderedDict((name, stored.maps[name]) for name in layers)
        grid_features = to_patch_tokens(maps, grid=self.config.grid)  # (B, C, g, g)
        tokens = grid_features.flatten(2).transpose(1, 2)  # (B, N, C), row-major
        return tokens.half().float().contiguous()

    def _cached_training_tokens(self, train: TrainSet, encoder: ImageEncoder, layers: list[str]) -> Tensor:
        """Encode every training image once through the feature cache; (M, N, C) float16 on the CPU."""
        cache = FeatureCache()
        images = (images for images, _ in train.batches(ENCODE_BATCH, shuffle=False))
        chunks = [self._tokens(features, layers).to("cpu", torch.float16)  # exact: the tokens are float16-rounded
                  for features in cache.encode_batches(encoder, images, total=len(train))]
        if not chunks:
            raise DetectorError("the training set is empty; UniAD needs at least one normal image")
        return torch.cat(chunks)  # (M, N, C)

    # ------------------------------------------------------------------ training

    def fit(self, train: TrainSet) -> UniAD:
        """Train the reconstruction transformer on the normal images of `train`; returns self.

        Randomness comes from `config.seed` alone; the caller's torch generators are left as they were.
        """
        device = torch.device(train.device)
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            module, meta, self.loss_history_ = self._fit(train, device)
        module.eval()
        self.module_, self.meta_ = module, meta
        return self

    def _fit(self, train: TrainSet, device: torch.device) -> tuple[nn.Module, dict[str, Any], list[float]]:
        c = self.config
        encoder = self._image_encoder(device)
        layers = self._feature_layers(encoder)
        tokens = self._cached_training_tokens(train, encoder, layers)  # (M, N, C) float16
        meta = {
            "backbone": c.backbone, "backbone_digest": encoder.digest, "feature_layers": layers,
            "feature_channels": int(tokens.shape[-1]), "class_names": list(train.class_names),
            "train_images": int(tokens.shape[0]),
        }
        torch.manual_seed(c.seed)
        module = self.build_module(meta).to(device)
        losses = self._train(module, tokens, device, Path(train.checkpoint_dir), meta)
        return module, meta, losses

    def _train(self, module: nn.Module, tokens: Tensor, device: torch.device, checkpoint_dir: Path,
               meta: dict[str, Any]) -> list[float]:
        """The training loop on cached tokens; resumes from `checkpoint_dir` when it holds a state. Returns epoch losses."""
        c = self.config
        optimizer = torch.optim.AdamW(module.parameters(), lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
        step_size = max(1, round(c.lr_drop_at * c.epochs))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=c.lr_drop_factor)
        losses: list[float] = []
        state = load_training_state(checkpoint_dir)
        if state is not None:
            losses = self._load_training_state(state, module, optimizer, scheduler, meta, checkpoint_dir)
        start = len(losses)
        bar = tqdm(range(start, c.epochs), initial=start, total=c.epochs, desc="uniad train", unit="epoch",
                   disable=not distributed.info().is_main)
        for epoch in bar:
            module.train()
            # every epoch has its own seed, so a resumed run replays exactly what an uninterrupted one does
            epoch_seed = c.seed * 1_000_003 + epoch
            torch.manual_seed(epoch_seed)  # dropout
            # batch order and jitter; each rank draws its own noise for its own shard
            generator = torch.Generator().manual_seed(epoch_seed + 7_919 * distributed.info().rank)
            order = torch.randperm(len(tokens), generator=generator)
            total = 0.0
            for start_index in range(0, len(order), c.batch_size):
                batch = tokens[order[start_index:start_index + c.batch_size]].to(device, torch.float32)  # (B, N, C)
                jittered = feature_jitter(batch, c.jitter_scale, c.jitter_prob, generator=generator)
                loss = F.mse_loss(module(jittered), batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(module.parameters())  # no-op in one process
                nn.utils.clip_grad_norm_(module.parameters(), c.grad_clip)
                optimizer.step()
                total += loss.item() * len(batch)
            scheduler.step()
            losses.append(total / len(tokens))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            self._save_training_state(checkpoint_dir, module, optimizer, scheduler, meta, losses)
        bar.close()
        return losses

    def _training_identity(self, meta: dict[str, Any]) -> str:
        """What a checkpoint must agree on to be resumed: the config and the learned facts, as JSON."""
        return json.dumps({"config": config_to_dict(self.config), "meta": meta}, sort_keys=True)

    def _save_training_state(self, checkpoint_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: Any, meta: dict[str, Any], losses: list[float]) -> None:
        """Keep model, optimizer and scheduler state and the epoch losses in `checkpoint_dir`, atomically."""
        save_training_state(checkpoint_dir, {
            "uniad": self._training_identity(meta),
            "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch_losses": list(losses),
        })

    def _load_training_state(self, state: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: Any, meta: dict[str, Any], checkpoint_dir: Path) -> list[float]:
        """Restore a state written by `_save_training_state`; returns the losses of the finished epochs."""
        if not isinstance(state, dict) or state.get("uniad") != self._training_identity(meta):
            raise DetectorError(
                f"the training state in {checkpoint_dir} was written by another model, config or split; "
                "resume with the same config and split, or use a fresh checkpoint folder"
            )
        module.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return [float(x) for x in state["epoch_losses"]]

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Anomaly maps (B, 224, 224) and image scores (B,) for images (B, 3, 224, 224) in [0, 1].

        class_idx is not used: one unified model serves every class.
        """
        self._check_fitted()
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise DetectorError(f"UniAD.predict expects images (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
        if class_idx.shape != images.shape[:1]:
            raise DetectorError(f"class_idx must have shape ({len(images)},), got {tuple(class_idx.shape)}")
        device = next(self.module_.parameters()).device
        encoder = self._image_encoder(device)
        features = self._tokens(encoder.encode_image(images.to(device)), self.meta_["feature_layers"])  # (B, N, C)
        maps = self._anomaly_maps(features)  # (B, 224, 224)
        scores = torch.from_numpy(image_score_from_map(maps)).float()  # (B,)
        return Prediction(image_scores=scores, anomaly_maps=maps)

    @torch.no_grad()
    def _anomaly_maps(self, features: Tensor) -> Tensor:
        """(B, N, C) feature tokens → (B, 224, 224) float32 CPU maps: ‖reconstruction − features‖₂ per token, upsampled."""
        self.module_.eval()
        reconstruction = self.module_(features)  # (B, N, C)
        grid = self.config.grid
        distance = (reconstruction - features).pow(2).sum(-1).sqrt()  # (B, N)
        small = distance.view(-1, 1, grid, grid)  # (B, 1, g, g), row-major tokens
        # align_corners=True as the official nn.UpsamplingBilinear2d
        maps = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True)
        return maps[:, 0].float().cpu()  # (B, 224, 224)

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, directory: Path) -> UniAD:
        """Rebuild a saved UniAD; the backbone must be the one it was trained on (same weights digest)."""
        detector = super().load(directory)
        encoder = detector._image_encoder(torch.device("cpu"))
        check_backbone_digest(detector.meta_, detector.config.backbone, encoder.digest, directory)
        return detector

