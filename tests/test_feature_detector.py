"""The base for feature-based detectors and the shared training helpers.

A new detector on frozen features is short: `NearestMeanDetector` below (the lines between the
markers, counted by a test) passes the conformance check.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ltbench.detector import TrainSet, prediction_from_maps
from ltbench.feature_detector import (
    FeatureDetector,
    FeatureMeta,
    TrainingFeatures,
    _gather_shards,
    grid_to_image,
)
from ltbench.testing import TensorTrainSet, check_detector, pattern_images
from ltbench.training import EpochBatches


# --- detector start
@dataclass(frozen=True)
class NearestMeanConfig:
    backbone: str = "tiny-align"  # frozen encoder
    layer: int = 2  # which encoder layer's map to use
    seed: int = 0  # unused randomness seed (the base seeds fit with it)


@dataclass(frozen=True)
class NearestMeanMeta(FeatureMeta):
    channels: int  # channels of the used map


class NearestMeanDetector(FeatureDetector):
    """Anomaly map = distance of each position's feature to its class's mean feature at that position."""

    Config = NearestMeanConfig
    Meta = NearestMeanMeta

    def build_module(self, meta: NearestMeanMeta) -> nn.Module:
        module = nn.Module()
        module.register_buffer("means", torch.zeros(len(meta.class_names), meta.channels, 1, 1))
        return module

    def learn(self, train: TrainSet, device: torch.device) -> tuple[nn.Module, NearestMeanMeta]:
        encoder = self.image_encoder(device)
        layer = encoder.layer_names[self.config.layer]
        data = self.encode_training_set(train, [layer])
        maps = data.maps[0].float()  # (M, C, H, W)
        meta = NearestMeanMeta(self.config.backbone, encoder.digest, (layer,), tuple(train.class_names), maps.shape[1])
        module = self.build_module(meta)
        for c in range(len(train.class_names)):
            module.means[c] = maps[data.class_idx == c].mean(dim=(0, 2, 3))[:, None, None]
        return module, meta

    @torch.no_grad()
    def predict(self, images: Tensor, class_idx: Tensor):
        device = self.check_inputs(images, class_idx)
        maps = self.image_encoder(device).encode_image(images.to(device)).maps[self.meta_.feature_layers[0]]
        distance = (maps - self.module_.means[class_idx]).norm(dim=1)  # (B, H, W)
        return prediction_from_maps(grid_to_image(distance))
# --- detector end


def test_a_detector_on_the_base_is_short_and_passes_the_conformance_check(tmp_path):
    source = inspect.getsource(inspect.getmodule(NearestMeanDetector))
    body = source.split("# --- detector start")[1].split("# --- detector end")[0]
    assert len(body.strip().splitlines()) < 60
    images, class_idx = pattern_images(n_classes=2, per_class=3)
    train = TensorTrainSet(images, class_idx, ["a", "b"], tmp_path / "ck")
    detector = check_detector(NearestMeanDetector, train, work_dir=tmp_path)
    assert detector.meta_.class_names == ("a", "b") and detector.module_.means.shape[:2] == (2, detector.meta_.channels)


def test_epoch_batches_slice_one_shared_order_into_weighted_rank_batches(monkeypatch):
    from ltbench import distributed

    one = [b.indices.tolist() for b in EpochBatches(11, 8, seed=5)]
    for world in (2, 3):
        parts = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "info", lambda r=rank, w=world: distributed.DistInfo(r, w))
            parts.append(list(EpochBatches(11, 8 // world if world == 2 else 3, seed=5)))
        if world == 2:  # same global batches as one process: rank slices interleave back into them
            for k, global_batch in enumerate(one):
                merged = sorted(i for p in parts for i in p[k].indices.tolist())
                assert merged == sorted(global_batch)
            # weights b·W/|global batch| make the averaged per-item-mean loss the global mean
            assert [p[1].weight for p in parts] == [2 * 2 / 3, 1 * 2 / 3]
        for p in parts:  # every rank has the same number of steps (no deadlock in all_reduce)
            assert len(p) == len(parts[0])


def test_gathered_shards_restore_the_original_order_without_padding():
    from ltbench.distributed import shard

    count, world = 11, 2
    values = torch.arange(count)
    shards = []
    for rank in range(world):
        mine = torch.tensor(shard(list(range(count)), rank, world))
        shards.append(TrainingFeatures([values[mine][:, None].float()], values[mine][:, None].float(), values[mine]))
    merged = _gather_shards(shards[0], shards, count)
    assert merged.class_idx.tolist() == list(range(count)) and merged.maps[0][:, 0].tolist() == list(range(count))


def test_grid_to_image_upsamples_a_row_major_grid():
    scores = torch.arange(4.0).view(1, 4)  # 2×2 grid, row-major
    maps = grid_to_image(scores, align_corners=True)
    assert maps.shape == (1, 224, 224)
    assert maps[0, 0, 0] == 0 and maps[0, 0, -1] == 1 and maps[0, -1, 0] == 2 and maps[0, -1, -1] == 3
