"""The `draem` detector: DRAEM (Zavrtanik et al., ICCV 2021) trained on raw images with simulated anomalies.

fit: every epoch is one shuffled pass over the training images (`TrainSet.batches`, each rank its
shard under torchrun); each batch is resized to the network's input size, put in BGR order,
given simulated anomalies (`augment.synthesize`, from a generator seeded by the epoch), and both
sub-networks take one Adam step on L2 + SSIM + focal loss. The training state is saved after
every epoch, so `--resume` continues an interrupted run and ends with the same weights.
predict: pixel map = softmax channel 1 of the discriminative network, unsmoothed, resized
bilinearly from the input size to 224×224; image score = DRAEM's own: the max of the 21×21
mean-filtered map at the input size (test_DRAEM.py L103-107).
One model serves all classes (the LTAD paper's multi-class protocol, notes/baselines.md section
7), not DRAEM's one model per class; class_idx is only checked.
Defaults are the official ones (VitjanZ/DRAEM 2dbf673; notes/baselines.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from baselines.draem.augment import AugmentSettings, TextureSource, synthesize
from baselines.draem.model import INPUT_MULTIPLE, DRAEMNetwork, draem_loss, image_score_from_map, init_weights
from baselines.draem.textures import FolderTextures, GeneratedTextures
from ltbench import distributed
from ltbench.detector import IMAGE_SIZE, Prediction, TorchDetector, TrainSet
from ltbench.errors import ConfigError, DetectorError
from ltbench.training import TrainingProgress, epoch_seed, optimizer_step, rank_seed, training_identity

GENERATED = "generated"  # the `anomaly_source` value for LTBench's own procedural textures


@dataclass(frozen=True)
class DRAEMConfig:
    """Configuration of DRAEM; defaults are the official code's (VitjanZ/DRAEM 2dbf673) unless noted."""

    # networks (model_unet.py; train_DRAEM.py L32-38)
    reconstructive_width: int = 128  # ReconstructiveSubNetwork base_width (model_unet.py L6)
    discriminative_width: int = 64  # DiscriminativeSubNetwork base_channels (model_unet.py L17)
    # the side the networks run at (official resize_shape [256, 256], train_DRAEM.py L53): the 224×224
    # images are resized to it bilinearly, and the maps back to 224; a multiple of 32, at least 64
    input_size: int = 256
    bgr: bool = True  # channel order fed to the networks: BGR, as the official cv2.imread (traps 1)
    # anomaly simulation (data_loader.py L78-134)
    # "generated" (LTBench's procedural textures, offline; see textures.py) or a folder of texture images,
    # e.g. DTD's dtd/images as the official --anomaly_source_path (read as <folder>/*/*.jpg)
    anomaly_source: str = GENERATED
    generated_textures: int = 5640  # size of the generated bank when anomaly_source is "generated" (DTD has 5640)
    max_scale_exponent: int = 5  # Perlin scale 2^k per axis, k ~ U{0..5} (randint(0, 6), L109-111)
    mask_threshold: float = 0.5  # threshold of the rotated Perlin noise (L116)
    max_beta: float = 0.8  # β ~ U(0, 0.8), the normal image's weight inside the mask (L124)
    clean_probability: float = 0.5  # samples left without an anomaly (L131)
    rotate_probability: float = 0.3  # normal image rotated by U(-90, 90) degrees (L148)
    texture_augmenters: int = 3  # of the 10 imgaug augmenters, applied to each texture (L100)
    # training (README command; train_DRAEM.py L43-56, L98)
    epochs: int = 700  # README: --epochs 700
    batch_size: int = 8  # README: --bs 8
    lr: float = 1e-4  # README: --lr 0.0001, Adam (default betas, no weight decay) for both networks
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # MultiStepLR at 0.8·epochs and 0.9·epochs (L47)
    lr_gamma: float = 0.2  # MultiStepLR gamma (L47)
    # scoring (test_DRAEM.py L105-107)
    score_filter: int = 21  # side of the mean filter before the image score's max
    seed: int = 0  # weight init and every augmentation draw (the official code is unseeded)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_milestones", tuple(float(m) for m in self.lr_milestones))
        problems = []
        if self.reconstructive_width < 1 or self.discriminative_width < 1:
            problems.append("reconstructive_width and discriminative_width must be >= 1")
        if self.input_size < 2 * INPUT_MULTIPLE or self.input_size % INPUT_MULTIPLE:
            # 5 max-pools and Perlin scales up to 32; at 32 px the deepest map is 1×1 and BatchNorm fails on a
            # last batch of one image
            problems.append(f"input_size must be a multiple of {INPUT_MULTIPLE} and at least {2 * INPUT_MULTIPLE}; "
                            f"got {self.input_size}")
        if not self.anomaly_source:
            problems.append(f"anomaly_source must be {GENERATED!r} or a folder of texture images (e.g. dtd/images)")
        if self.generated_textures < 1:
            problems.append(f"generated_textures must be >= 1; got {self.generated_textures}")
        if not 0 <= self.max_scale_exponent <= 5:
            problems.append(f"max_scale_exponent must be in 0..5 (scales up to 32); got {self.max_scale_exponent}")
        if not 0.0 <= self.max_beta <= 1.0:
            problems.append(f"max_beta must be in [0, 1]; got {self.max_beta}")
        for name in ("clean_probability", "rotate_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if not 0 <= self.texture_augmenters <= 10:
            problems.append(f"texture_augmenters must be in 0..10; got {self.texture_augmenters}")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
        if self.lr <= 0 or not 0 < self.lr_gamma <= 1:
            problems.append("lr must be > 0 and lr_gamma in (0, 1]")
        if any(not 0 < m <= 1 for m in self.lr_milestones):
            problems.append(f"lr_milestones are fractions of the epochs in (0, 1]; got {list(self.lr_milestones)}")
        if self.score_filter < 1 or self.score_filter % 2 == 0:
            problems.append(f"score_filter must be an odd size >= 1; got {self.score_filter}")
        if problems:
            raise ConfigError("invalid DRAEM config: " + "; ".join(problems))

    def augment_settings(self) -> AugmentSettings:
        """The simulation knobs of this config."""
        return AugmentSettings(max_scale_exponent=self.max_scale_exponent, threshold=self.mask_threshold,
                               max_beta=self.max_beta, clean_probability=self.clean_probability,
                               rotate_probability=self.rotate_probability, texture_augmenters=self.texture_augmenters)


@dataclass(frozen=True)
class DRAEMMeta:
    """What DRAEM learns about its data in `fit` (saved in config.json)."""

    class_names: tuple[str, ...]  # the split's class order; class_idx indexes it
    train_images: int  # training images (over all ranks)
    anomaly_textures: int  # textures in the anomaly source trained with


class DRAEM(TorchDetector):
    """DRAEM: a reconstructive and a discriminative sub-network trained on simulated anomalies."""

    Config: ClassVar[type] = DRAEMConfig
    Meta: ClassVar[type] = DRAEMMeta
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the official networks and schedule
        "paper": {"reconstructive_width": 128, "discriminative_width": 64, "input_size": 256, "epochs": 700},
        # synth/exp100 on 2 CPU cores in under 10 minutes (README, "Presets"): 1/16 and 1/8 of the official
        # widths at 96 px (~0.64 CPU-s per step of 8), 15 epochs with a larger step for the few epochs
        "quick": {"reconstructive_width": 8, "discriminative_width": 8, "input_size": 96, "epochs": 15,
                  "lr": 1e-3},
    }

    def build_module(self, meta: DRAEMMeta) -> nn.Module:
        """Both sub-networks at the configured widths."""
        return DRAEMNetwork(self.config.reconstructive_width, self.config.discriminative_width)

    # ------------------------------------------------------------------ inputs

    def to_network(self, images: Tensor) -> Tensor:
        """(B, 3, 224, 224) RGB in [0, 1] → (B, 3, S, S) at the input size, in the network's channel order.

        Bilinear without antialiasing, as cv2.resize's default INTER_LINEAR; no normalisation (traps 1).
        """
        if self.config.bgr:
            images = images.flip(1)
        size = self.config.input_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    def texture_source(self) -> TextureSource:
        """The anomaly source of the config: the generated bank or a texture folder."""
        c = self.config
        if c.anomaly_source == GENERATED:
            return GeneratedTextures(c.generated_textures, c.input_size, c.seed)
        return FolderTextures(Path(c.anomaly_source), c.input_size, bgr=c.bgr)

    # ------------------------------------------------------------------ training

    def fit(self, train: TrainSet) -> DRAEM:
        """Train both sub-networks on simulated anomalies over the normal images of `train`; returns self."""
        c = self.config
        device = torch.device(train.device)
        source = self.texture_source()
        total = getattr(train, "total", len(train))
        if total < 1:
            raise DetectorError("the training set is empty; DRAEM needs at least one normal image")
        meta = DRAEMMeta(class_names=tuple(train.class_names), train_images=int(total), anomaly_textures=len(source))
        module = self.build_module(meta)
        init_weights(module, torch.Generator().manual_seed(c.seed))
        module.to(device)
        progress = TrainingProgress(Path(train.checkpoint_dir), training_identity(c, meta))
        self.loss_history_ = self._train(module, train, source, device, progress)
        module.eval()
        self.module_, self.meta_ = module, meta
        return self

    def _train(self, module: DRAEMNetwork, train: TrainSet, source: TextureSource, device: torch.device,
               progress: TrainingProgress) -> list[float]:
        """The epoch loop; resumes from the checkpoint folder when it holds a state. Returns the epoch losses."""
        c = self.config
        optimizer = torch.optim.Adam([{"params": module.reconstructive.parameters(), "lr": c.lr},
                                      {"params": module.discriminative.parameters(), "lr": c.lr}])
        milestones = sorted({max(1, round(m * c.epochs)) for m in c.lr_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=c.lr_gamma)
        parts = {"model": module, "optimizer": optimizer, "scheduler": scheduler}
        saved = progress.restore(parts)
        losses = [float(x) for x in saved["epoch_losses"]] if saved else []
        settings = c.augment_settings()
        params = list(module.parameters())
        bar = tqdm(range(len(losses), c.epochs), initial=len(losses), total=c.epochs, desc="draem train",
                   unit="epoch", disable=not distributed.info().is_main)
        for epoch in bar:
            module.train()
            seed = epoch_seed(c.seed, epoch)
            rng = np.random.default_rng(rank_seed(seed))  # every augmentation draw of this epoch on this rank
            summed = torch.zeros(2, dtype=torch.float64)  # (loss · images, images) over this rank's batches
            for images, _ in train.batches(c.batch_size, shuffle=True, seed=seed):
                sample = synthesize(self.to_network(images.to(device)), source, rng, settings)
                reconstruction, logits = module(sample.augmented)
                loss, _ = draem_loss(reconstruction, sample.target, logits, sample.mask)
                optimizer_step(optimizer, loss, [params], grad_clip=None)
                summed += torch.tensor([loss.item() * len(images), len(images)], dtype=torch.float64)
            scheduler.step()
            summed = distributed.all_reduce_sum(summed)
            losses.append(float(summed[0] / summed[1].clamp(min=1)))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            progress.save(parts, epoch_losses=list(losses))
        bar.close()
        return losses

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Anomaly maps (B, 224, 224) and DRAEM's image scores (B,) for images (B, 3, 224, 224) RGB in [0, 1]."""
        device = self.check_inputs(images, class_idx)
        self.module_.eval()
        _, logits = self.module_(self.to_network(images.to(device)))
        probability = torch.softmax(logits, dim=1)[:, 1]  # (B, S, S), unsmoothed (traps 2)
        scores = image_score_from_map(probability, self.config.score_filter)  # (B,) at the input size, as the official
        maps = probability[:, None]
        if maps.shape[-1] != IMAGE_SIZE:
            maps = F.interpolate(maps, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return Prediction(image_scores=scores.float().cpu(), anomaly_maps=maps[:, 0].float().cpu())
