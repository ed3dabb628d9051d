"""PatchCore: patch features, coreset and nearest neighbours against brute-force references; the detector.

Detector tests run on the `lite` backbone (its stride-8 and stride-16 maps, 28×28 and 14×14 at 224,
stand in for layer2 and layer3) on the striped images of the UniAD tests.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from test_uniad import striped_images

from baselines.patchcore import PatchCore, PatchCoreConfig, memory
from baselines.patchcore.detector import coreset_size
from ltbench.detector import make_config
from ltbench.errors import ConfigError, DetectorError
from ltbench.testing import TensorTrainSet, check_detector

LITE = {"backbone": "lite", "feature_layers": ("block4", "block10")}

# ----------------------------------------------------------------------------- pure pieces


def test_patch_features_have_the_official_shapes_and_effective_weights():
    # notes section 9: layer2 512×28×28 + layer3 1024×14×14 → 784 patches of 1024-d per image
    generator = torch.Generator().manual_seed(0)
    layer2, layer3 = torch.randn(1, 512, 28, 28, generator=generator), torch.randn(1, 1024, 14, 14, generator=generator)
    features = memory.patch_embeddings([layer2, layer3], 1024, 1024)
    assert features.shape == (1, 784, 1024)
    # notes section 5, "effective feature": dims 0-511 = layer2 channel c, 3×3 mean with centre weight 2/10;
    # dims 512-1023 = mean of layer3 channels (2j, 2j+1), each 3×3-averaged (zero padding), then upsampled
    weights = torch.ones(3, 3)
    weights[1, 1] = 2
    centre_weighted = F.conv2d(layer2, (weights / 10).expand(512, 1, 3, 3), padding=1, groups=512)  # (1, 512, 28, 28)
    box = F.avg_pool2d(layer3, 3, stride=1, padding=1, count_include_pad=True)  # (1, 1024, 14, 14)
    pairs = F.interpolate(box.view(1, 512, 2, 14, 14).mean(2), size=(28, 28), mode="bilinear", align_corners=False)
    expected = torch.cat([centre_weighted, pairs], 1).flatten(2).transpose(1, 2)  # (1, 784, 1024)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def brute_force_greedy(points: np.ndarray, count: int, starts: np.ndarray) -> list[int]:
    """The official greedy loop over a full N × N Euclidean distance matrix (float64)."""
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))  # (N, N)
    current = distances[:, starts].mean(1)
    chosen = []
    for _ in range(count):
        index = int(np.argmax(current))
        chosen.append(index)
        current = np.minimum(current, distances[:, index])
    return chosen


def test_coreset_selects_exactly_the_brute_force_greedy_indices():
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(400, 16, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, 16, dtype=torch.float64)
    starts = memory.draw_starts(400, 10, generator)
    assert len(set(starts.tolist())) == 10
    chosen = memory.greedy_coreset(points, 40, starts)
    assert chosen.tolist() == brute_force_greedy(points.numpy(), 40, starts.numpy())


def test_coreset_size_follows_the_official_rule():
    assert coreset_size(209 * 784, 0.1) == 16_385  # notes section 9: bottle, 163,856 patches
    assert coreset_size(784, 0.01) == 7 and coreset_size(5, 0.1) == 1 and coreset_size(784, 1.0) == 784


def test_random_projection_is_linear_default_init():
    weights = memory.random_projection(1024, 128, torch.Generator().manual_seed(0))
    assert weights.shape == (128, 1024)
    assert weights.abs().max() <= 1 / 32 and weights.abs().max() > 0.99 / 32  # U(-1/√1024, 1/√1024)


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_distances_equal_brute_force_in_small_chunks(k, monkeypatch):
    monkeypatch.setattr(memory, "CHUNK_ELEMENTS", 4096)  # bank chunks of 4 rows: the merge across chunks is exercised
    generator = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(150, 24, generator=generator), torch.randn(37, 24, generator=generator)
    distances, indices = memory.nearest_distances(queries, bank, k)
    exact = torch.cdist(queries.double(), bank.double()) ** 2  # (150, 37)
    expected, expected_indices = torch.topk(exact, k, dim=1, largest=False)
    torch.testing.assert_close(distances.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(indices, expected_indices)


# ----------------------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return striped_images(8, seed=0)[0]


def two_classes(images: torch.Tensor, checkpoint_dir) -> TensorTrainSet:
    return TensorTrainSet(images, torch.arange(len(images)) % 2, ["stripes", "bands"], checkpoint_dir)


@pytest.fixture(scope="module")
def fitted(train_images, tmp_path_factory) -> PatchCore:
    return PatchCore(PatchCoreConfig(**LITE, coreset_fraction=0.05)).fit(
        two_classes(train_images, tmp_path_factory.mktemp("checkpoints")))


def test_anomalies_rank_above_normals_and_scores_are_brute_force_nearest_neighbours(fitted):
    normal, _ = striped_images(4, seed=1)
    anomalous, masks = striped_images(4, seed=2, anomalous=True)
    images, class_idx = torch.cat([normal, anomalous]), torch.arange(8) % 2
    prediction = fitted.predict(images, class_idx)
    assert prediction.image_scores.shape == (8,) and prediction.anomaly_maps.shape == (8, 224, 224)
    assert roc_auc_score([0] * 4 + [1] * 4, prediction.image_scores.numpy()) == 1.0
    assert roc_auc_score(masks.flatten().numpy(), prediction.anomaly_maps[4:].flatten().numpy()) >= 0.9
    # each patch score is the squared distance to the nearest entry of its class's bank
    from ltbench.feature_cache import FeatureCache
    maps = FeatureCache().encode(fitted.image_encoder("cpu"), images).maps  # cached by predict: no new encoding
    patches = fitted.embed([maps[name] for name in fitted.meta_.feature_layers])  # (8, 784, 1024)
    scores = fitted.patch_scores(images, class_idx)
    for row in (0, 1, 7):
        bank = fitted.module_.bank(int(class_idx[row])).double()
        exact = (torch.cdist(patches[row].double(), bank) ** 2).min(1).values  # (784,)
        torch.testing.assert_close(scores[row].double(), exact, rtol=1e-4, atol=1e-2)
    assert torch.equal(prediction.image_scores, scores.max(1).values)  # image score = max patch score


def test_the_map_is_the_upsampled_patch_grid_blurred_with_sigma_4(fitted):
    from scipy.ndimage import gaussian_filter

    images = striped_images(2, seed=4, anomalous=True)[0]
    class_idx = torch.tensor([0, 1])
    scores = fitted.patch_scores(images, class_idx).view(2, 1, 28, 28)
    upsampled = F.interpolate(scores, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    expected = np.stack([gaussian_filter(m, sigma=4) for m in upsampled.double().numpy()])
    np.testing.assert_allclose(fitted.predict(images, class_idx).anomaly_maps.numpy(), expected, rtol=1e-5, atol=1e-3)


def test_banks_hold_the_coreset_of_each_class(fitted):
    assert fitted.meta_.bank_sizes == (coreset_size(4 * 784, 0.05),) * 2 and fitted.meta_.train_patches == 8 * 784
    assert fitted.module_.features.shape == (2 * coreset_size(4 * 784, 0.05), 1024)


def test_per_class_and_shared_banks_differ_where_a_class_looks_like_another(train_images, tmp_path):
    # class 0: stripes; class 1: flat grey images. A flat image presented as class 0 is anomalous for the
    # per-class bank of stripes, but normal for the shared bank, which also holds class 1's patches.
    flat = torch.full((4, 3, 224, 224), 0.4) + 0.01 * torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images = torch.cat([train_images[:4], flat.clamp(0, 1)])
    labels = torch.tensor([0] * 4 + [1] * 4)
    train = TensorTrainSet(images, labels, ["stripes", "flat"], tmp_path)
    per_class = PatchCore(PatchCoreConfig(**LITE, coreset_fraction=1.0)).fit(train)
    shared = PatchCore(PatchCoreConfig(**LITE, coreset_fraction=1.0, bank="shared")).fit(train)
    assert per_class.meta_.bank_sizes == (4 * 784, 4 * 784) and shared.meta_.bank_sizes == (8 * 784,)
    query = images[4:5]  # a flat training image, presented as a "stripes" image
    as_stripes = torch.tensor([0])
    per_class_score = per_class.patch_scores(query, as_stripes)
    shared_score = shared.patch_scores(query, as_stripes)
    # with every patch kept, the shared bank is the union: its distance is the smaller of the two classes'
    as_flat = per_class.patch_scores(query, torch.tensor([1]))
    torch.testing.assert_close(shared_score, torch.minimum(per_class_score, as_flat), rtol=1e-5, atol=1e-3)
    assert float(shared_score.max()) < 1e-2 * float(per_class_score.min())


def test_a_class_with_one_training_image_gets_that_images_patches(train_images, tmp_path):
    labels = torch.tensor([0, 0, 0, 1])
    detector = PatchCore(PatchCoreConfig(**LITE, coreset_fraction=1.0)).fit(
        TensorTrainSet(train_images[:4], labels, ["many", "one"], tmp_path))
    assert detector.meta_.bank_sizes == (3 * 784, 784)
    scores = detector.patch_scores(train_images[3:4], torch.tensor([1]))  # the one training image itself
    assert float(scores.max()) < 1e-2 * float(detector.patch_scores(train_images[:1], torch.tensor([1])).max())
    subsampled = PatchCore(PatchCoreConfig(**LITE, coreset_fraction=0.1)).fit(
        TensorTrainSet(train_images[:4], labels, ["many", "one"], tmp_path / "p"))
    assert subsampled.meta_.bank_sizes == (235, 78)


def test_per_class_bank_needs_every_class(train_images, tmp_path):
    train = TensorTrainSet(train_images[:2], torch.tensor([0, 0]), ["seen", "unseen"], tmp_path)
    with pytest.raises(DetectorError, match="'unseen' has no training image.*bank=shared"):
        PatchCore(PatchCoreConfig(**LITE)).fit(train)


def test_patchcore_passes_the_conformance_check_and_reloads_identically(train_images, tmp_path):
    config = PatchCoreConfig(**LITE, coreset_fraction=0.02, bank="shared")
    detector = check_detector(PatchCore, two_classes(train_images[:4], tmp_path / "checkpoints"), config=config,
                              work_dir=tmp_path)
    detector.save(tmp_path / "model")
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.meta_ == detector.meta_ and torch.equal(loaded.module_.features, detector.module_.features)
    payload = json.loads((tmp_path / "model" / "config.json").read_text())
    payload["meta"]["backbone_digest"] = "0" * 64
    (tmp_path / "model" / "config.json").write_text(json.dumps(payload))
    with pytest.raises(DetectorError, match="digest"):
        PatchCore.load(tmp_path / "model")


def test_quality_beats_the_same_detector_on_a_random_backbone(train_images, tmp_path):
    # PatchCore has no training steps, so its "untrained" control is the same detector on random features:
    # `tiny-align` (seeded random EfficientNet); the pretrained features must rank anomalies far better.
    normal, _ = striped_images(4, seed=1)
    anomalous, _ = striped_images(4, seed=2, anomalous=True)
    images, labels = torch.cat([normal, anomalous]), [0] * 4 + [1] * 4
    train = two_classes(train_images, tmp_path)
    aurocs = {}
    for name, layers in (("lite", LITE["feature_layers"]), ("tiny-align", ("block2", "block4"))):
        detector = PatchCore(PatchCoreConfig(backbone=name, feature_layers=layers, coreset_fraction=0.05)).fit(train)
        aurocs[name] = roc_auc_score(labels, detector.predict(images, torch.zeros(8, dtype=torch.int64)).image_scores)
    assert aurocs["lite"] >= 0.95 and aurocs["lite"] - aurocs["tiny-align"] >= 0.2, aurocs


@pytest.mark.parametrize("values, message", [
    ({"patch_size": 2}, "patch_size"), ({"coreset_fraction": 0.0}, "coreset_fraction"),
    ({"bank": "global"}, "bank"), ({"neighbours": 0}, "neighbours"), ({"feature_layers": []}, "feature_layers"),
])
def test_invalid_config_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(PatchCoreConfig, values)


def test_presets_paper_is_the_official_baseline_and_quick_runs_on_lite():
    paper = make_config(PatchCoreConfig, PatchCore.PRESETS["paper"])
    official = {"backbone": "wide_resnet50_2", "feature_layers": ("layer2", "layer3"), "patch_size": 3,
                "pretrain_dim": 1024, "target_dim": 1024, "coreset_fraction": 0.1, "coreset_projection": 128,
                "coreset_starts": 10, "neighbours": 1, "blur_sigma": 4.0, "bank": "per_class", "seed": 0}
    assert dataclasses.asdict(paper) == official and paper == PatchCoreConfig()
    quick = make_config(PatchCoreConfig, PatchCore.PRESETS["quick"])
    assert quick.backbone == "lite" and quick.feature_layers == ("block4", "block10")
    assert make_config(PatchCoreConfig, json.loads(json.dumps(dataclasses.asdict(quick)))) == quick


def test_the_paper_presets_layers_give_784_patches_of_1024_dims():
    # the real Wide-ResNet-50-2 on the meta device (no memory, no compute): layer2 + layer3 of notes section 9
    from ltbench import imagenet
    from ltbench.imagenet_encoders import TorchvisionImageEncoder

    with torch.device("meta"):
        encoder = TorchvisionImageEncoder("wide_resnet50_2", imagenet.wide_resnet50_2(), device="meta")
    paper = make_config(PatchCoreConfig, PatchCore.PRESETS["paper"])
    maps = encoder.encode_image(torch.rand(2, 3, 224, 224)).maps
    assert [tuple(maps[name].shape) for name in paper.feature_layers] == [(2, 512, 28, 28), (2, 1024, 14, 14)]
    patches = memory.patch_embeddings([maps[name] for name in paper.feature_layers], paper.pretrain_dim, paper.target_dim)
    assert tuple(patches.shape) == (2, 784, 1024)
