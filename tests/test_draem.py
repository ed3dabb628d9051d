"""DRAEM (baselines/draem/): network shapes, Perlin noise, the anomaly simulation, the losses, the scores, the detector.

Every formula is checked against a direct computation (numpy/scipy loops or filters); detector
tests use tiny widths at a small input size so that the whole file runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from baselines.draem import DRAEM, DRAEMConfig, augment
from baselines.draem.augment import (
    TEXTURE_AUGMENTERS,
    AugmentSettings,
    TextureSource,
    augment_texture,
    rand_perlin_2d,
    rotate,
    synthesize,
)
from baselines.draem.model import (
    DRAEMNetwork,
    focal_loss,
    gaussian_window,
    image_score_from_map,
    init_weights,
    ssim_loss,
)
from baselines.draem.textures import FolderTextures, GeneratedTextures
from ltbench.detector import get_detector_class, load_training_state, make_config
from ltbench.errors import ConfigError, DetectorError
from ltbench.testing import Interrupted, TensorTrainSet, check_detector, interrupt_training

TINY = {"reconstructive_width": 4, "discriminative_width": 4, "input_size": 64, "batch_size": 4,
        "generated_textures": 16, "lr": 2e-3}

# ----------------------------------------------------------------------------- networks


def test_official_widths_give_the_shapes_of_the_notes_at_256():
    """notes/baselines.md section 9, computed on the meta device (no arithmetic, no memory)."""
    with torch.device("meta"):
        network = DRAEMNetwork()
        images = torch.empty(2, 3, 256, 256)
        bottleneck = network.reconstructive.encoder(images)
        reconstruction, logits = network(images)
        blocks = network.discriminative.encoder_segment(torch.empty(2, 6, 256, 256))
    assert bottleneck.shape == (2, 1024, 16, 16) and reconstruction.shape == (2, 3, 256, 256)
    assert blocks[-1].shape == (2, 512, 8, 8) and logits.shape == (2, 2, 256, 256)
    assert network.discriminative.encoder_segment.block1[0].in_channels == 6
    keys = set(network.state_dict())  # the official module names, so a released state dict maps key for key
    assert {"reconstructive.encoder.block1.0.weight", "reconstructive.decoder.fin_out.0.weight",
            "discriminative.encoder_segment.block6.3.weight", "discriminative.decoder_segment.up_b.1.weight",
            "discriminative.decoder_segment.db4.4.running_var"} <= keys


def test_weight_init_is_the_official_one_and_seeded():
    first, second = DRAEMNetwork(8, 8), DRAEMNetwork(8, 8)
    init_weights(first, torch.Generator().manual_seed(3))
    init_weights(second, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = DRAEMNetwork(8, 8)
    init_weights(other, torch.Generator().manual_seed(4))
    assert not torch.equal(other.reconstructive.encoder.block1[0].bias, first.reconstructive.encoder.block1[0].bias)
    convs = torch.cat([m.weight.detach().flatten() for m in first.modules() if isinstance(m, torch.nn.Conv2d)])
    bn = [m for m in first.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert abs(float(convs.mean())) < 2e-3 and abs(float(convs.std()) - 0.02) < 1e-3
    bn_weights = torch.cat([m.weight.detach() for m in bn])
    assert abs(float(bn_weights.mean()) - 1.0) < 5e-3 and all(bool((m.bias == 0).all()) for m in bn)


# ----------------------------------------------------------------------------- Perlin noise


def perlin_by_loops(shape, res, angles):
    """The Perlin value of every pixel computed one at a time from the lattice angles."""
    out = np.zeros(shape)
    grads = np.stack((np.cos(angles), np.sin(angles)), -1)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    for i in range(shape[0]):
        for j in range(shape[1]):
            u, v = i * res[0] / shape[0], j * res[1] / shape[1]
            ci, cj, fu, fv = int(u), int(v), u - int(u), v - int(v)
            dots = {(a, b): (fu - a) * grads[ci + a, cj + b, 0] + (fv - b) * grads[ci + a, cj + b, 1]
                    for a in (0, 1) for b in (0, 1)}
            x0 = dots[0, 0] + fade(fu) * (dots[1, 0] - dots[0, 0])
            x1 = dots[0, 1] + fade(fu) * (dots[1, 1] - dots[0, 1])
            out[i, j] = math.sqrt(2) * (x0 + fade(fv) * (x1 - x0))
    return out


def test_perlin_noise_matches_a_pixel_by_pixel_computation():
    shape, res = (16, 8), (4, 2)
    noise = rand_perlin_2d(shape, res, np.random.default_rng(5))
    angles = 2 * math.pi * np.random.default_rng(5).random((res[0] + 1, res[1] + 1))  # the same first draw
    np.testing.assert_allclose(noise, perlin_by_loops(shape, res, angles), atol=1e-5)


@pytest.mark.parametrize("res", [(1, 1), (2, 8), (32, 4)])
def test_perlin_scale_sets_the_number_of_gradient_cells(res):
    noise = rand_perlin_2d((64, 64), res, np.random.default_rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() <= 1.0
    rows, cols = 64 // res[0], 64 // res[1]
    lattice = np.zeros((64, 64), dtype=bool)
    lattice[::rows, ::cols] = True  # the lattice points, where the noise is exactly 0
    assert np.abs(noise[lattice]).max() < 1e-6
    assert lattice.sum() == res[0] * res[1] and np.abs(noise[~lattice]).max() > 0.05


def test_perlin_noise_is_determined_by_the_seed():
    a = rand_perlin_2d((32, 32), (4, 4), np.random.default_rng(1))
    assert np.array_equal(a, rand_perlin_2d((32, 32), (4, 4), np.random.default_rng(1)))
    assert not np.array_equal(a, rand_perlin_2d((32, 32), (4, 4), np.random.default_rng(2)))
    with pytest.raises(ValueError, match="divisible"):
        rand_perlin_2d((30, 32), (4, 4), np.random.default_rng(1))


# ----------------------------------------------------------------------------- anomaly simulation


def test_rotation_turns_about_the_centre():
    images = torch.rand(2, 3, 16, 16)
    turned = rotate(images, torch.tensor([90.0, 0.0]))
    torch.testing.assert_close(turned[0], torch.rot90(images[0], 1, (1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(turned[1], images[1], atol=1e-6, rtol=0)
    corner = rotate(torch.ones(1, 1, 16, 16), torch.tensor([45.0]))[0, 0]
    assert corner[0, 0] == 0 and corner[8, 8] == 1  # zero fill outside the turned square


class ConstantTextures(TextureSource):
    """Every texture one constant grey: the blend can then be solved for β."""

    def __init__(self, size: int, value: int = 200):
        self.size, self.value = size, value

    def __len__(self) -> int:
        return 3

    def texture(self, index: int) -> np.ndarray:
        return np.full((self.size, self.size, 3), self.value, dtype=np.uint8)


def test_simulated_anomalies_blend_only_inside_a_binary_mask_and_half_the_samples_stay_clean():
    size, rounds = 32, 50
    images = 0.2 + 0.1 * torch.rand(8, 3, size, size)  # below the texture's grey everywhere
    rng = np.random.default_rng(0)
    settings = AugmentSettings(texture_augmenters=0)  # the texture stays the constant grey 200/255
    clean, rotated, betas = 0, 0, []
    for _ in range(rounds):
        batch = synthesize(images, ConstantTextures(size), rng, settings)
        assert set(batch.mask.unique().tolist()) <= {0.0, 1.0} and batch.mask.shape == (8, 1, size, size)
        outside = batch.mask.expand(-1, 3, -1, -1) == 0
        assert torch.equal(batch.augmented[outside], batch.target[outside])
        assert bool((batch.mask[batch.clean] == 0).all())
        clean += int(batch.clean.sum())
        rotated += int((batch.target != images).flatten(1).any(1).sum())
        for index in torch.nonzero(~batch.clean).flatten():
            inside = batch.mask[index, 0] == 1
            if inside.sum() == 0:
                continue
            texture, target = 200 / 255, batch.target[index][:, inside]
            beta = (batch.augmented[index][:, inside] - texture) / (target - texture)  # (1-β)·t + β·x solved for β
            assert float(beta.max() - beta.min()) < 1e-4  # one β per sample
            betas.append(float(beta.mean()))
    assert abs(clean / (8 * rounds) - 0.5) < 0.06  # clean_probability 0.5 (400 draws: σ = 0.025)
    assert abs(rotated / (8 * rounds) - 0.3) < 0.06  # rotate_probability 0.3
    assert 0 <= min(betas) and max(betas) <= 0.8 and max(betas) > 0.6 and min(betas) < 0.2  # β ~ U(0, 0.8)
    again = synthesize(images, ConstantTextures(size), np.random.default_rng(7), settings)
    repeat = synthesize(images, ConstantTextures(size), np.random.default_rng(7), settings)
    assert torch.equal(again.augmented, repeat.augmented) and torch.equal(again.mask, repeat.mask)


def test_texture_augmenters_keep_the_texture_format_and_three_are_applied():
    texture = GeneratedTextures(4, 32, seed=0).texture(1)
    rng = np.random.default_rng(0)
    for augmenter in TEXTURE_AUGMENTERS:
        out = augmenter(texture, rng)
        assert out.dtype == np.uint8 and out.shape == texture.shape, augmenter.__name__
    assert np.array_equal(TEXTURE_AUGMENTERS[6](texture, rng), 255 - texture)  # Invert
    gammas = np.random.default_rng(4).uniform(0.5, 2.0, size=3)
    expected = np.round(255 * (texture / 255.0) ** gammas).astype(np.uint8)
    assert np.array_equal(TEXTURE_AUGMENTERS[0](texture, np.random.default_rng(4)), expected)  # GammaContrast
    chosen = np.random.default_rng(9).choice(10, size=3, replace=False)
    calls = []

    def recorder(index):
        def augmenter(image, rng):
            calls.append(index)
            return image
        return augmenter

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(augment, "TEXTURE_AUGMENTERS", tuple(recorder(i) for i in range(10)))
        augment_texture(texture, np.random.default_rng(9))
    assert calls == list(chosen) and len(set(calls)) == 3


def test_generated_textures_are_seeded_and_varied():
    bank = GeneratedTextures(6, 64, seed=0)
    textures = [bank.texture(i) for i in range(6)]
    assert all(t.shape == (64, 64, 3) and t.dtype == np.uint8 for t in textures)
    assert np.array_equal(textures[2], GeneratedTextures(6, 64, seed=0).texture(2))
    assert not np.array_equal(textures[2], GeneratedTextures(6, 64, seed=1).texture(2))
    assert all(t.std() > 3 for t in textures) and len({t.tobytes() for t in textures}) == 6
    small = GeneratedTextures(6, 64, seed=0)
    small.MEMORY_LIMIT = 2 * textures[0].nbytes  # keeps two; the others are rendered again, identically
    assert all(np.array_equal(small.texture(i), textures[i]) for i in (0, 1, 2, 3, 2))
    assert sorted(small._bank) == [0, 1]


def test_a_texture_folder_is_read_as_dtd_in_bgr_order(tmp_path):
    (tmp_path / "dtd" / "banded").mkdir(parents=True)
    colour = np.zeros((40, 50, 3), dtype=np.uint8)
    colour[..., 0] = 250  # pure red in RGB
    Image.fromarray(colour).save(tmp_path / "dtd" / "banded" / "banded_0001.jpg", quality=100)
    source = FolderTextures(tmp_path / "dtd", size=32)
    texture = source.texture(0)
    assert len(source) == 1 and texture.shape == (32, 32, 3)
    assert texture[..., 2].min() > 240 and texture[..., 0].max() < 15  # red is the last channel in BGR
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .jpg"):
        FolderTextures(tmp_path / "empty", size=32)


# ----------------------------------------------------------------------------- losses and scores


def ssim_direct(x: np.ndarray, y: np.ndarray, dynamic_range: float) -> float:
    """Mean SSIM over every pixel and channel with scipy correlations (zero padding), for one image (C, H, W)."""
    window = gaussian_window(11).double().numpy()

    def blur(a):
        return np.stack([ndimage.correlate(channel, window, mode="constant") for channel in a])

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * dynamic_range) ** 2, (0.03 * dynamic_range) ** 2
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_ssim_loss_is_zero_for_identical_images_and_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 20, 24, generator=generator), torch.rand(1, 3, 20, 24, generator=generator)
    assert abs(float(ssim_loss(x, x))) < 1e-6
    expected = 1 - ssim_direct(x[0].double().numpy(), y[0].double().numpy(), 1.0)
    assert float(ssim_loss(x, y)) == pytest.approx(expected, abs=1e-5)
    low = x - 1.0  # a reconstruction below -0.5: the official range rule makes L = 2 (traps 5)
    expected = 1 - ssim_direct(low[0].double().numpy(), y[0].double().numpy(), 2.0)
    assert float(ssim_loss(low, y)) == pytest.approx(expected, abs=1e-5)


def test_focal_loss_on_probabilities_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(2, 2, 5, 6, generator=generator), dim=1)
    mask = (torch.rand(2, 1, 5, 6, generator=generator) > 0.6).float()
    total = 0.0
    for b in range(2):
        for i in range(5):
            for j in range(6):
                label = int(mask[b, 0, i, j])
                p_true, p_other = float(probabilities[b, label, i, j]), float(probabilities[b, 1 - label, i, j])
                pt = (1 - 1e-5) * p_true + 1e-5 * p_other + 1e-5  # smoothed one-hot, then + smooth
                total += -((1 - pt) ** 2) * math.log(pt)
    assert float(focal_loss(probabilities, mask)) == pytest.approx(total / 60, rel=1e-5)


def test_image_score_is_the_max_of_the_21x21_mean_filter_with_zero_padding():
    maps = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    maps[1, :4, :4] = 5.0  # a hot corner: the zero padding counts in the mean
    expected = [ndimage.uniform_filter(m.double().numpy(), size=21, mode="constant").max() for m in maps]
    torch.testing.assert_close(image_score_from_map(maps), torch.tensor(expected, dtype=torch.float32))


# ----------------------------------------------------------------------------- the detector


def smooth_images(count: int, seed: int, anomalous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth colour gradients; anomalies are 56×56 patches of uniform noise. Returns images and masks (count, 224, 224)."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 224)
    images, masks = [], []
    for _ in range(count):
        tint = 0.3 + 0.4 * torch.rand(3, generator=generator)
        image = tint.view(3, 1, 1) * (0.6 + 0.4 * ramp.view(1, 1, -1)) * torch.ones(3, 224, 224)
        mask = torch.zeros(224, 224, dtype=torch.bool)
        if anomalous:
            row, col = torch.randint(16, 224 - 72, (2,), generator=generator).tolist()
            image[:, row:row + 56, col:col + 56] = torch.rand(3, 56, 56, generator=generator)
            mask[row:row + 56, col:col + 56] = True
        images.append(image.clamp(0, 1))
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


def make_train_set(images: torch.Tensor, checkpoint_dir: Path) -> TensorTrainSet:
    class_idx = torch.arange(len(images)) % 2  # two classes, one model
    return TensorTrainSet(images, class_idx, ["plain", "tinted"], checkpoint_dir)


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return smooth_images(16, seed=0)[0]


def test_draem_passes_the_detector_conformance_check(train_images, tmp_path):
    config = DRAEMConfig(**TINY, epochs=1)
    detector = check_detector(DRAEM, make_train_set(train_images[:6], tmp_path / "checkpoints"), config=config,
                              work_dir=tmp_path)
    assert detector.meta_.train_images == 6 and detector.meta_.anomaly_textures == 16
    assert get_detector_class("draem") is DRAEM


def test_predict_returns_the_unsmoothed_softmax_map_of_the_bgr_input_and_draem_s_image_score(train_images, tmp_path):
    config = DRAEMConfig(**{**TINY, "input_size": 224, "epochs": 1})  # 224: no resizing, the map is the network's
    detector = DRAEM(config).fit(make_train_set(train_images[:2], tmp_path))
    images = smooth_images(2, seed=5, anomalous=True)[0]
    assert torch.equal(detector.to_network(images), images.flip(1))  # BGR, no normalisation
    prediction = detector.predict(images, torch.zeros(2, dtype=torch.int64))
    with torch.no_grad():
        _, logits = detector.module_(images.flip(1))
    expected = torch.softmax(logits, dim=1)[:, 1]
    torch.testing.assert_close(prediction.anomaly_maps, expected, atol=1e-6, rtol=0)
    direct = [ndimage.uniform_filter(m.double().numpy(), size=21, mode="constant").max() for m in expected]
    torch.testing.assert_close(prediction.image_scores, torch.tensor(direct, dtype=torch.float32), atol=1e-5, rtol=0)
    with pytest.raises(DetectorError, match="class_idx must lie"):
        detector.predict(images, torch.tensor([0, 2]))


def test_a_class_with_one_training_image_is_trained_and_scored(train_images, tmp_path):
    images = train_images[:5]
    class_idx = torch.tensor([0, 0, 0, 0, 1])  # "tinted" has one image
    train = TensorTrainSet(images, class_idx, ["plain", "tinted"], tmp_path)
    detector = DRAEM(DRAEMConfig(**TINY, epochs=1)).fit(train)
    prediction = detector.predict(images[4:], torch.tensor([1]))
    assert prediction.anomaly_maps.shape == (1, 224, 224) and bool(torch.isfinite(prediction.image_scores).all())


def test_training_beats_the_untrained_control(train_images, tmp_path):
    """The quality test: the same model after its seeded init and no optimisation step, on the same test set."""
    # 100 steps of 8 (2 per epoch); in a separate loop, widths 8 began to segment the noise patches after ~80 steps
    config = DRAEMConfig(**{**TINY, "reconstructive_width": 8, "discriminative_width": 8, "batch_size": 8,
                            "lr": 3e-3}, epochs=50)
    trained = DRAEM(config).fit(make_train_set(train_images, tmp_path))
    control = DRAEM(config)
    control.meta_ = trained.meta_
    control.module_ = control.build_module(trained.meta_)
    init_weights(control.module_, torch.Generator().manual_seed(config.seed))  # exactly the trained model's start
    control.module_.eval()
    normal, _ = smooth_images(8, seed=1)
    anomalous, masks = smooth_images(8, seed=2, anomalous=True)
    images, labels = torch.cat([normal, anomalous]), [0] * 8 + [1] * 8
    results = {}
    for name, detector in (("trained", trained), ("control", control)):
        prediction = detector.predict(images, torch.zeros(16, dtype=torch.int64))
        results[name] = (roc_auc_score(labels, prediction.image_scores.numpy()),
                         roc_auc_score(masks.flatten().numpy(), prediction.anomaly_maps[8:].flatten().numpy()))
    # measured on this task (seed 0, one thread): trained 0.66 image / 0.82 pixel AUROC, control 0.38 / 0.65
    assert results["trained"][0] > results["control"][0] + 0.15, results
    assert results["trained"][1] > results["control"][1] + 0.1 and results["trained"][1] >= 0.75, results
    assert trained.loss_history_[-1] < 0.5 * trained.loss_history_[0]  # measured 1.37 → about 0.2


def test_an_interrupted_fit_resumes_to_the_same_result(train_images, tmp_path, monkeypatch):
    config = DRAEMConfig(**TINY, epochs=4)  # milestones at epochs 3 and 4: the scheduler matters
    images = train_images[:8]
    straight = DRAEM(config).fit(make_train_set(images, tmp_path / "straight"))

    interrupt_training(monkeypatch, lambda values: len(values["epoch_losses"]) == 2)
    with pytest.raises(Interrupted):
        DRAEM(config).fit(make_train_set(images, tmp_path / "interrupted"))
    assert len(load_training_state(tmp_path / "interrupted")["epoch_losses"]) == 2
    monkeypatch.undo()
    resumed = DRAEM(config).fit(make_train_set(images, tmp_path / "interrupted"))
    assert resumed.loss_history_ == straight.loss_history_
    for name, tensor in straight.module_.state_dict().items():
        assert torch.equal(resumed.module_.state_dict()[name], tensor), name
    with pytest.raises(DetectorError, match="another model, config or split"):
        DRAEM(dataclasses.replace(config, max_beta=0.5)).fit(make_train_set(images, tmp_path / "interrupted"))


def test_a_missing_anomaly_source_folder_is_a_config_error(train_images, tmp_path):
    detector = DRAEM(DRAEMConfig(**TINY, anomaly_source=str(tmp_path / "no-dtd")))
    with pytest.raises(ConfigError, match="no-dtd is not a folder"):
        detector.fit(make_train_set(train_images[:2], tmp_path))


@pytest.mark.parametrize("values, message", [
    ({"input_size": 100}, "multiple of 32"),
    ({"input_size": 32}, "at least 64"),
    ({"max_scale_exponent": 6}, "max_scale_exponent"),
    ({"clean_probability": 1.5}, "clean_probability"),
    ({"score_filter": 20}, "odd"),
    ({"lr_milestones": [0.8, 1.2]}, "lr_milestones"),
    ({"epochs": 0}, "epochs"),
])
def test_invalid_config_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(DRAEMConfig, values)


def test_presets_paper_is_the_official_recipe_and_quick_is_small():
    paper = make_config(DRAEMConfig, DRAEM.PRESETS["paper"])
    official = {"reconstructive_width": 128, "discriminative_width": 64, "input_size": 256, "bgr": True,
                "epochs": 700, "batch_size": 8, "lr": 1e-4, "lr_milestones": (0.8, 0.9), "lr_gamma": 0.2,
                "max_scale_exponent": 5, "mask_threshold": 0.5, "max_beta": 0.8, "clean_probability": 0.5,
                "rotate_probability": 0.3, "texture_augmenters": 3, "score_filter": 21}
    assert {k: getattr(paper, k) for k in official} == official
    quick = make_config(DRAEMConfig, DRAEM.PRESETS["quick"])
    assert quick.input_size < 256 and quick.reconstructive_width < 128 and quick.epochs < 50
    assert make_config(DRAEMConfig, json.loads(json.dumps(dataclasses.asdict(paper)))) == paper
