"""Cut & Paste: augmentations, shapes (notes/baselines.md section 9), the GDE score against sklearn, the contract."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.covariance import LedoitWolf

from baselines.cutpaste import CutPaste, CutPasteConfig
from baselines.cutpaste.augment import AREA_RATIO, _rgb_to_hsv, color_jitter, cutpaste, rotate_expanded, scar
from baselines.cutpaste.detector import CutPasteNet, augment_batch
from ltbench import imagenet
from ltbench.detector import BUILTIN_DETECTORS, resolve_detector
from ltbench.errors import ConfigError, DetectorError, LTBenchError
from ltbench.leaderboard import PAPER_METHODS
from ltbench.testing import TensorTrainSet, check_detector, pattern_images

# a ResNet-18 of width 8 from scratch at 64x64: the same code path as the paper preset, in seconds
TINY = {"network": "resnet18", "pretrained": False, "width": 8, "image_size": 64, "steps": 2, "batch_size": 4}


def train_set(tmp_path, keep: list[int] | None = None) -> TensorTrainSet:
    images, class_idx = pattern_images(2, 4)
    if keep is not None:
        images, class_idx = images[keep], class_idx[keep]
    return TensorTrainSet(images, class_idx, ["a", "b"], tmp_path / "checkpoints")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> CutPaste:
    """A tiny Cut & Paste that passed the conformance check (anomaly maps None: detection only)."""
    work = tmp_path_factory.mktemp("cutpaste")
    return check_detector(CutPaste, train_set(work), config=CutPasteConfig(**TINY), work_dir=work)


# ----------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("size", [64, 128])
def test_cutpaste_and_scar_change_only_the_pasted_region(size):
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(size))
    for seed in range(6):
        for augment in (cutpaste, scar):
            pasted = augment(image, torch.Generator().manual_seed(seed))
            assert pasted.image.shape == image.shape and pasted.mask.shape == (size, size)
            assert torch.equal(pasted.image[:, ~pasted.mask], image[:, ~pasted.mask])  # untouched outside
            assert bool(pasted.mask.any()) and not torch.equal(pasted.image, image)
            again = augment(image, torch.Generator().manual_seed(seed))                 # seeded: reproducible
            assert torch.equal(again.image, pasted.image) and torch.equal(again.mask, pasted.mask)
        rows, cols = torch.nonzero(cutpaste(image, torch.Generator().manual_seed(seed)).mask, as_tuple=True)
        box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
        assert box == len(rows)                                            # CutPaste pastes a full rectangle
        assert AREA_RATIO[0] * 0.8 <= box / size**2 <= AREA_RATIO[1] * 1.2  # 2-15 % of the area, up to rounding
        scar_area = int(scar(image, torch.Generator().manual_seed(seed)).mask.sum())
        assert 1 <= scar_area <= 18 * 27                                     # a 2-16 x 10-25 strip, rotated


def test_rotation_and_hsv_against_independent_references():
    patch = torch.rand(3, 5, 9)
    rotated, outline = rotate_expanded(patch, 90.0)      # PIL rotate(90, expand=True): counter-clockwise
    assert torch.equal(rotated, torch.rot90(patch, 1, dims=(1, 2))) and bool(outline.all())
    same, outline = rotate_expanded(patch, 0.0)
    assert torch.equal(same, patch) and bool(outline.all())
    _, outline = rotate_expanded(torch.rand(3, 20, 4), 45.0)
    assert outline.shape == (17, 17) and 70 <= int(outline.sum()) <= 90   # the 80-pixel strip, nearest sampling
    pixels = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    hsv = _rgb_to_hsv(pixels)
    for y in range(4):
        for x in range(4):
            expected = colorsys.rgb_to_hsv(*pixels[:, y, x].tolist())
            assert hsv[:, y, x].tolist() == pytest.approx(list(expected), abs=1e-6)
    assert torch.equal(color_jitter(pixels, torch.Generator(), 0.0), pixels)


# ----------------------------------------------------------------------------- shapes


def test_shapes_of_the_resnet18_network_and_the_3way_batch():
    # notes section 9: ResNet-18 GAP embedding B x 512; head output B x 128; logits B x 3 at 256x256
    net = CutPasteNet(CutPasteConfig(), gaussians=1).eval()
    with torch.no_grad():
        embedding, logits = net(torch.rand(2, 3, 256, 256))
        head = net.head(embedding)
    assert embedding.shape == (2, 512) and head.shape == (2, 128) and logits.shape == (2, 3)
    assert sum(p.numel() for p in net.trunk.parameters()) == 11_689_512 - 513_000  # torchvision's, minus fc
    # --batch_size 32 in 3way: a forward batch of 96, labels [0]*32 + [1]*32 + [2]*32
    inputs, labels = augment_batch(torch.rand(32, 3, 32, 32), "3way", 0.1, torch.Generator().manual_seed(0))
    assert inputs.shape == (96, 3, 32, 32)
    assert labels.tolist() == [0] * 32 + [1] * 32 + [2] * 32


# ----------------------------------------------------------------------------- the GDE score


def test_score_is_the_ledoit_wolf_mahalanobis_distance_of_sklearn(fitted):
    train_images, _ = pattern_images(2, 4)
    test_images, test_idx = pattern_images(2, 3, seed=5)
    test_images[:, :, 20:60, 20:60] = 1.0 - test_images[:, :, 20:60, 20:60]  # some far from the training set
    reference = LedoitWolf().fit(fitted.embed(train_images).double().numpy())
    expected = np.sqrt(reference.mahalanobis(fitted.embed(test_images).double().numpy()))  # sklearn: squared
    prediction = fitted.predict(test_images, test_idx)
    assert prediction.anomaly_maps is None and prediction.image_scores.shape == (6,)
    np.testing.assert_allclose(prediction.image_scores.numpy(), expected, rtol=1e-4)
    assert fitted.meta_.gaussians == 1 and fitted.meta_.train_images == 8 and fitted.unscorable_classes_ == {}


def test_per_class_density_and_a_class_with_one_image(tmp_path):
    keep = [0, 1, 2, 3, 4]  # class "b" keeps one training image: no per-class covariance
    detector = check_detector(CutPaste, train_set(tmp_path, keep),
                              config=CutPasteConfig(**TINY, density="per_class"), work_dir=tmp_path)
    assert detector.unscorable_classes_ == {"b": "1 training image; a per-class Gaussian needs 2"}
    images, class_idx = pattern_images(2, 4)
    reference = LedoitWolf().fit(detector.embed(images[:4]).double().numpy())        # class "a" alone
    expected = np.sqrt(reference.mahalanobis(detector.embed(images[:4]).double().numpy()))
    np.testing.assert_allclose(detector.predict(images[:4], class_idx[:4]).image_scores.numpy(), expected, rtol=1e-4)
    with pytest.raises(DetectorError, match=r"cannot score \['b'\]: 1 training image"):
        detector.predict(images[4:], class_idx[4:])


# ----------------------------------------------------------------------------- weights, config, registry


def test_paper_network_loads_resnet18_weights_in_the_hub_format(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=generator) if v.ndim > 1 else v  # random convs, sane BN statistics
             for k, v in imagenet.resnet18(width=8, seed=3).state_dict().items()}  # includes fc.* as on the Hub
    save_file(state, str(tmp_path / "model.safetensors"))
    config = CutPasteConfig(**{**TINY, "network": f"resnet18:{tmp_path}", "pretrained": True, "steps": 1})
    detector = CutPaste(config).fit(train_set(tmp_path))
    trunk = detector.module_.trunk.net.state_dict()
    assert "fc.weight" not in trunk
    assert torch.equal(trunk["conv1.weight"], state["conv1.weight"])  # step 1 of 20 frozen: the loaded weights
    assert torch.equal(trunk["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    wrong = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(LTBenchError, match="missing key 'layer1.0.conv1.weight'"):
        CutPaste(config).fit(train_set(tmp_path))


def test_registered_presets_and_config_errors():
    assert BUILTIN_DETECTORS["cutpaste"] == "baselines.cutpaste:CutPaste" and PAPER_METHODS["cutpaste"] == "Cut & Paste"
    assert resolve_detector("cutpaste").cls is CutPaste
    paper, quick = CutPaste.PRESETS["paper"], CutPaste.PRESETS["quick"]
    assert CutPasteConfig(**paper) == CutPasteConfig()  # the paper preset is the default recipe
    defaults = CutPasteConfig()
    assert (defaults.lr, defaults.momentum, defaults.weight_decay, defaults.freeze_steps) == (0.03, 0.9, 3e-5, 20)
    assert (defaults.steps, defaults.batch_size, defaults.head_dims, defaults.variant) == (10000, 32, (512, 128), "3way")
    assert quick["network"] == "lite" and CutPasteConfig(**quick).steps < 100
    for values, message in [({"network": "vgg"}, "network must be one of"), ({"density": "knn"}, "density"),
                            ({"variant": "4way"}, "variant"), ({"steps": -1}, "steps"), ({"lr": 0}, "lr")]:
        with pytest.raises(ConfigError, match=message):
            CutPasteConfig(**values)
