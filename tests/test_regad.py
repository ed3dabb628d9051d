"""RegAD: the STN, the loss, the support augmentation, the Gaussian scoring, training pairs, the contract, N/A classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from baselines.regad import RegAD, RegADConfig
from baselines.regad.detector import pair_batches
from baselines.regad.model import (
    STNEncoder,
    STNModule,
    invert_affine,
    rotation_scale_theta,
    symmetric_cosine_loss,
    warp,
)
from baselines.regad.scoring import (
    augment_support,
    embedding_concat,
    fit_position_gaussian,
    mahalanobis_map,
)
from baselines.regad.stages import backbone_stages
from ltbench.errors import ConfigError, DetectorError
from ltbench.maps import gaussian_blur
from ltbench.testing import TensorTrainSet, check_detector, pattern_images

TINY = {"backbone": "tiny", "epochs": 1, "batch_size": 4, "support_draws": 1}


def smooth_map(channels: int = 3, size: int = 28) -> torch.Tensor:
    """A (1, C, size, size) map of low-frequency waves: bilinear resampling is nearly exact on it."""
    grid = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    return torch.stack([torch.sin(2 * x + c) + torch.cos(3 * y - c) for c in range(channels)])[None]


# ----------------------------------------------------------------------------- STN


def test_stn_at_initialisation_is_the_identity_and_leaves_features_unchanged():
    torch.manual_seed(0)
    stn = STNModule(channels=4, map_size=28).eval()
    x = torch.randn(2, 4, 28, 28)
    warped, theta = stn(x)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3))
    assert torch.allclose(warped, x, atol=1e-5)

    stages = backbone_stages("tiny")
    encoder = STNEncoder(stages.modules, stages.channels, [56, 28, 14]).eval()
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        last, aligned = encoder(images, aligned=True)
        plain = images
        for stage, expected in zip(stages.modules, aligned):
            plain = stage(plain)
            assert torch.allclose(expected, plain, rtol=1e-4, atol=1e-4)  # warped, unwarped by identities
    assert [tuple(a.shape[1:]) for a in aligned] == [(8, 56, 56), (16, 28, 28), (32, 14, 14)]
    assert torch.allclose(last, plain, rtol=1e-4, atol=1e-4)


def test_the_inverse_warp_undoes_a_known_rotation_and_scale():
    theta = rotation_scale_theta(torch.tensor([[0.3, 1.1, 0.9]]))  # (1, 2, 3)
    expected = torch.tensor([[math.cos(0.3) * 1.1, -math.sin(0.3), 0], [math.sin(0.3), math.cos(0.3) * 0.9, 0]])
    assert torch.allclose(theta[0], expected)
    inverse = invert_affine(theta)
    composed = torch.cat([theta[0], torch.tensor([[0.0, 0, 1]])]) @ torch.cat([inverse[0], torch.tensor([[0.0, 0, 1]])])
    assert torch.allclose(composed, torch.eye(3), atol=1e-6)

    x = smooth_map(size=56)
    back = warp(warp(x, theta), inverse)
    centre = slice(14, 42)  # the corners rotate out of the frame and come back as reflections
    error = (back - x)[..., centre, centre].abs().max()
    assert error < 0.05, error
    assert (warp(x, theta) - x)[..., centre, centre].abs().max() > 0.3  # the rotation did move things


# ----------------------------------------------------------------------------- loss


def test_symmetric_cosine_loss_matches_a_direct_computation_and_stops_the_gradient():
    generator = torch.Generator().manual_seed(1)
    p1, z1, p2, z2 = (torch.randn(2, 5, 3, 3, generator=generator, requires_grad=True) for _ in range(4))
    loss = symmetric_cosine_loss(p1, z1, p2, z2)

    def negative_cosine(p: np.ndarray, z: np.ndarray) -> float:
        dots = (p * z).sum(axis=1)
        return float(-(dots / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))).mean())

    a, b, c, d = (t.detach().numpy().astype(np.float64) for t in (p1, z1, p2, z2))
    assert loss.item() == pytest.approx(negative_cosine(a, d) / 2 + negative_cosine(c, b) / 2, abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the targets
    assert p1.grad is not None and p1.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- scoring


def test_support_augmentation_gives_22_images_per_support_image():
    images = torch.rand(2, 3, 32, 32)
    augmented = augment_support(images)
    assert augmented.shape == (44, 3, 32, 32)
    assert torch.equal(augmented[:2], images)
    assert torch.equal(augmented[34:36], images.flip(-1))  # after 2 + 16 rotations and 16 translations
    grey = augmented[36:38]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert torch.allclose(grey[:, 0], 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])
    assert torch.equal(augmented[38:40], torch.rot90(images, 1, dims=(-2, -1)))
    # an affine rotation by a quarter turn (the official kornia path) is a pixel permutation: torch.rot90
    quarter = warp(images, torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]]).expand(2, 2, 3))
    assert any(torch.allclose(quarter, torch.rot90(images, k, dims=(-2, -1)), atol=1e-5) for k in (1, 3))


def test_embedding_concat_repeats_each_coarse_cell_over_its_block():
    fine, coarse = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2)
    joined = embedding_concat([fine, coarse])
    assert joined.shape == (1, 5, 4, 4)
    assert torch.equal(joined[:, :2], fine)
    for row in range(4):
        for col in range(4):
            assert torch.equal(joined[0, 2:, row, col], coarse[0, :, row // 2, col // 2])


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30])
def test_diverged_support_embeddings_are_a_clear_error_not_a_linalg_crash(bad):
    support = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    support[1, 0, 1] = bad
    with pytest.raises(DetectorError, match="not positive definite even with the ridge 0.01.*lower lr"):
        fit_position_gaussian(support, 0.01)


@pytest.mark.parametrize("count, channels", [(12, 7), (5, 9)])
def test_mahalanobis_map_matches_numpy_with_the_ridge(count, channels):
    generator = torch.Generator().manual_seed(2)
    positions = 6
    support = torch.randn(count, channels, positions, generator=generator) * torch.linspace(0.5, 3, channels)[:, None]
    test = torch.randn(3, channels, positions, generator=generator) * 2
    got = mahalanobis_map(test, fit_position_gaussian(support, 0.01)).numpy()
    assert got.shape == (3, positions)
    for p in range(positions):
        samples = support[:, :, p].double().numpy()
        precision = np.linalg.inv(np.cov(samples.T) + 0.01 * np.eye(channels))
        mean = samples.mean(axis=0)
        for b in range(3):
            delta = test[b, :, p].double().numpy() - mean
            assert got[b, p] == pytest.approx(math.sqrt(delta @ precision @ delta), rel=1e-5)


def test_gaussian_blur_matches_scipy_gaussian_filter():
    maps = torch.rand(2, 40, 30, generator=torch.Generator().manual_seed(3)).double()
    got = gaussian_blur(maps, 4.0).numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i], ndimage.gaussian_filter(maps[i].numpy(), sigma=4), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- training pairs


def test_pair_batches_hold_one_class_each_and_supports_are_other_images_of_that_class():
    labels = torch.tensor([0] * 7 + [1] * 2 + [2] * 1)
    batches = pair_batches(labels, [0, 1], batch_size=3, shot=2, generator=torch.Generator().manual_seed(0))
    queries = torch.cat([q for q, _ in batches])
    assert sorted(queries.tolist()) == list(range(9))  # every image of the trained classes, once
    assert len(batches) == 3 + 1
    for q, s in batches:
        assert len(q) <= 3 and s.shape == (len(q), 2)
        assert len(set(labels[q].tolist()) | set(labels[s].flatten().tolist())) == 1
        assert not (s == q[:, None]).any()


# ----------------------------------------------------------------------------- detector


def tiny_train_set(tmp_path, per_class: tuple[int, ...] = (3, 3)) -> TensorTrainSet:
    images, labels = pattern_images(len(per_class), max(per_class))
    keep = torch.cat([torch.nonzero(labels == k).flatten()[:n] for k, n in enumerate(per_class)])
    names = [f"class{k}" for k in range(len(per_class))]
    return TensorTrainSet(images[keep], labels[keep], names, tmp_path / "checkpoints")


def test_regad_passes_the_detector_conformance_check(tmp_path):
    detector = check_detector(RegAD, tiny_train_set(tmp_path), config=RegADConfig(**TINY), work_dir=tmp_path)
    assert detector.unscorable_classes_ == {}
    assert len(detector.loss_history_) == 1


def test_a_class_with_one_training_image_is_unscorable_and_fit_does_not_hang(tmp_path):
    train = tiny_train_set(tmp_path, per_class=(3, 1))
    detector = RegAD(RegADConfig(**TINY)).fit(train)
    reason = "1 training image; RegAD needs 2 support images"
    assert detector.unscorable_classes_ == {"class1": reason}
    normal = train.images[:2]
    prediction = detector.predict(normal, torch.tensor([0, 0]))
    assert prediction.anomaly_maps.shape == (2, 224, 224)
    # fresh normals of class 0 against one with a bright square: the defect scores higher, and its map peaks there
    fresh, fresh_labels = pattern_images(2, 3, seed=7)
    fresh = fresh[fresh_labels == 0]
    defect = fresh[:1].clone()
    defect[:, :, 150:190, 40:80] = 1.0
    scored = detector.predict(torch.cat([fresh, defect]), torch.zeros(4, dtype=torch.int64))
    assert scored.image_scores[3] > scored.image_scores[:3].max()
    peak = int(scored.anomaly_maps[3].argmax())
    assert 140 <= peak // 224 < 200 and 30 <= peak % 224 < 90, divmod(peak, 224)
    with pytest.raises(DetectorError, match="class1"):
        detector.predict(train.images[3:], torch.tensor([1]))
    detector.save(tmp_path / "model")
    loaded = RegAD.load(tmp_path / "model")
    assert loaded.unscorable_classes_ == {"class1": reason}
    assert torch.equal(loaded.predict(normal, torch.tensor([0, 0])).anomaly_maps, prediction.anomaly_maps)


def test_no_class_with_two_images_is_a_clear_error(tmp_path):
    with pytest.raises(DetectorError, match="at least 2 training images"):
        RegAD(RegADConfig(**TINY)).fit(tiny_train_set(tmp_path, per_class=(1, 1)))


@pytest.mark.parametrize("values, message", [({"backbone": "vgg"}, "backbone"), ({"shot": 0}, "shot"),
                                             ({"covariance_ridge": 0}, "covariance_ridge")])
def test_invalid_config_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        RegADConfig(**values)


def test_queries_per_class_caps_each_class_per_epoch():
    labels = torch.tensor([0] * 7 + [1] * 2)
    batches = pair_batches(labels, [0, 1], batch_size=3, shot=2, generator=torch.Generator().manual_seed(0),
                           queries_per_class=4)
    queries = torch.cat([q for q, _ in batches])
    assert (labels[queries] == 0).sum() == 4 and (labels[queries] == 1).sum() == 2


def test_the_paper_backbone_is_resnet18_with_the_imagenet_file_loaded_strictly(tmp_path):
    from safetensors.torch import save_file

    from ltbench.errors import BackboneError
    from ltbench.imagenet import resnet18

    source = resnet18(seed=5)  # random weights in the on-disk format of timm/resnet18.tv_in1k
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    stages = backbone_stages(f"resnet18:{tmp_path}")
    assert stages.channels == [64, 128, 256] and stages.strides == (4, 8, 16)
    assert torch.equal(stages.modules[0][0][0].weight, source.conv1.weight)
    assert torch.equal(stages.modules[2][1].conv2.weight, source.layer3[1].conv2.weight)
    with torch.no_grad():
        x = torch.rand(1, 3, 224, 224)
        for module in stages.modules:
            x = module(x)
    assert x.shape == (1, 256, 14, 14)
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("layer3.0.conv1")},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(BackboneError, match="layer3.0.conv1"):
        backbone_stages(f"resnet18:{tmp_path}")
    assert RegAD.PRESETS["paper"] == {"backbone": "resnet18", "epochs": 50, "support_draws": 10}
    config = RegADConfig()
    assert (config.backbone, config.epochs, config.batch_size, config.lr, config.shot) == ("resnet18", 50, 32, 1e-4, 2)
