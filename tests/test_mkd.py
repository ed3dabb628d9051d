"""MKD: the cloner's official layout and shapes, the loss and the guided-backprop maps against direct
computations, and the detector on the `lite` teacher (the quick preset's layers, a few epochs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score
from test_uniad import striped_images
from torch import nn

from baselines.mkd import MKD, MKDConfig
from baselines.mkd.model import CLONER_B, Cloner, distillation_loss, guided_relus, saliency_maps
from ltbench.detector import make_config
from ltbench.errors import ConfigError
from ltbench.testing import TensorTrainSet, check_detector

# ----------------------------------------------------------------------------- pure pieces


def test_cloner_has_the_official_layout_and_shapes():
    student = Cloner(CLONER_B)
    # network.py: outputs at features 2, 5, ..., 38; positions [3], [6], [9], [12] = 11, 20, 29, 38 are its max-pools
    assert student.pool_indices[1:] == [11, 20, 29, 38]
    convs = [m for m in student.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in student.features) == 8  # none after the 5 pre-pool convs
    assert isinstance(student.features[3], nn.Conv2d) and isinstance(student.features[4], nn.ReLU)  # conv, ReLU, pool
    pooled = student(torch.rand(2, 3, 128, 128))
    # notes section 9: pool2-pool5 at 128 input, the teacher's shapes
    assert [tuple(p.shape) for p in pooled[1:]] == [(2, 128, 32, 32), (2, 256, 16, 16), (2, 512, 8, 8), (2, 512, 4, 4)]


def test_loss_equals_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 8, 8), (3, 6, 4, 4)]
    student = [torch.randn(s, generator=generator) for s in shapes]
    teacher = [torch.randn(s, generator=generator) + 0.5 * st for s, st in zip(shapes, student)]
    expected = np.zeros(3)
    for s, t in zip(student, teacher):
        s, t = s.double().numpy().reshape(3, -1), t.double().numpy().reshape(3, -1)
        cosine = (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
        expected += (1 - cosine) + 0.5 * ((s - t) ** 2).mean(1)
    np.testing.assert_allclose(distillation_loss(student, teacher, 0.5).numpy(), expected, rtol=1e-5)
    # the training loss is its batch mean: the official mean cosine term + λ · nn.MSELoss per layer
    official = sum(torch.mean(1 - nn.CosineSimilarity()(s.view(3, -1), t.view(3, -1))) + 0.5 * nn.MSELoss()(s, t)
                   for s, t in zip(student, teacher))
    torch.testing.assert_close(distillation_loss(student, teacher, 0.5).mean(), official)


def test_guided_backprop_passes_only_positive_gradients_through_active_relus():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 1, bias=False))
    x = torch.randn(1, 5, requires_grad=True)
    with guided_relus(net):
        (guided,) = torch.autograd.grad(net(x).sum(), x)
    w1, w2 = net[0].weight, net[2].weight  # (7, 5), (1, 7)
    hidden = x @ w1.T  # (1, 7)
    upstream = w2.clamp_min(0) * (hidden > 0)  # guided: positive part of the gradient, where active
    torch.testing.assert_close(guided, (upstream @ w1).detach())
    (vanilla,) = torch.autograd.grad(net(x).sum(), x)  # the hooks are gone afterwards
    torch.testing.assert_close(vanilla, ((w2 * (hidden > 0)) @ w1).detach())
    assert not torch.allclose(guided, vanilla)


def test_saliency_maps_follow_gbp_localization():
    gradients = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = saliency_maps(gradients, 4.0)
    for g, mine in zip(gradients.numpy(), ours.numpy()):
        grey = np.abs(g).sum(0)  # utils.convert_to_grayscale
        grey = np.clip((grey - grey.min()) / (np.percentile(grey, 99) - grey.min()), 0, 1)
        grey = np.abs(grey)
        grey = (grey - grey.min()) / (grey.max() - grey.min())
        np.testing.assert_allclose(mine, gaussian_filter(grey, sigma=4), atol=1e-10)
    assert torch.equal(saliency_maps(torch.zeros(1, 3, 8, 8), 4.0), torch.zeros(1, 8, 8))  # no NaN


# ----------------------------------------------------------------------------- detector

TINY = {"backbone": "lite", "teacher_layers": ("block4", "block10"), "score_layers": ("block10",),
        "student_stages": ((8, 40), (8, 112)), "student_taps": (0, 1), "student_pool_relu": False, "input_size": 56,
        "batch_size": 2,
        "teacher_raw_input": False, "teacher_gradient": False}
# the paper preset's options on `lite`: the teacher fed the raw 112×112 input (strides 4 and 8 give 28 and 14, as the
# student's second and third pools) and the saliency gradient through the teacher too
RAW = {"backbone": "lite", "teacher_layers": ("block2", "block4"), "score_layers": ("block4",),
       "student_stages": ((8,), (8, 24), (8, 40)), "student_taps": (1, 2), "student_pool_relu": False, "input_size": 112,
       "batch_size": 4,
       "teacher_raw_input": True, "teacher_gradient": True}


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return striped_images(8, seed=0)[0]


def two_classes(images: torch.Tensor, checkpoint_dir) -> TensorTrainSet:
    return TensorTrainSet(images, torch.arange(len(images)) % 2, ["stripes", "bands"], checkpoint_dir)


def test_training_lowers_the_loss_and_beats_the_untrained_student(train_images, tmp_path):
    normal, _ = striped_images(4, seed=1)
    anomalous, masks = striped_images(4, seed=2, anomalous=True)
    images, labels = torch.cat([normal, anomalous]), [0] * 4 + [1] * 4
    trained = MKD(MKDConfig(**TINY, epochs=6)).fit(two_classes(train_images, tmp_path / "trained"))
    assert trained.loss_history_[-1] < 0.92 * trained.loss_history_[0]
    control = MKD(MKDConfig(**TINY, epochs=1, lr=1e-12)).fit(two_classes(train_images, tmp_path / "control"))
    prediction = trained.predict(images, torch.zeros(8, dtype=torch.int64))
    assert prediction.anomaly_maps.shape == (8, 224, 224) and float(prediction.anomaly_maps.min()) >= 0
    untrained = control.predict(images, torch.zeros(8, dtype=torch.int64))
    assert roc_auc_score(labels, prediction.image_scores) >= 0.9
    # on this toy the untrained student also separates the images (noise raises the teacher's activations, hence
    # the loss), but only the trained student's gradients point at the anomalous pixels
    trained_pixels = roc_auc_score(masks.flatten(), prediction.anomaly_maps[4:].flatten())
    control_pixels = roc_auc_score(masks.flatten(), untrained.anomaly_maps[4:].flatten())
    assert trained_pixels >= 0.95 and trained_pixels - control_pixels >= 0.08, (trained_pixels, control_pixels)


def test_mkd_passes_the_conformance_check_with_a_one_image_class(train_images, tmp_path):
    # one unified student serves every class: a class with a single training image needs nothing special
    train = TensorTrainSet(train_images[:4], torch.tensor([0, 0, 0, 1]), ["many", "one"], tmp_path / "checkpoints")
    config = MKDConfig(**RAW, epochs=1)
    detector = check_detector(MKD, train, config=config, work_dir=tmp_path)
    assert detector.image_encoder("cpu").input_size == 112 and detector.image_encoder("cpu").pixel_std == 1.0
    _, gradients = detector.scores_and_gradients(train_images[:2], torch.tensor([0, 1]))
    assert gradients.shape == (2, 3, 112, 112) and bool(gradients.abs().sum() > 0)
    images = train_images[3:5]
    before = detector.predict(images, torch.tensor([1, 0]))
    detector.save(tmp_path / "model")
    after = MKD.load(tmp_path / "model").predict(images, torch.tensor([1, 0]))
    assert torch.equal(before.image_scores, after.image_scores) and torch.equal(before.anomaly_maps, after.anomaly_maps)


@pytest.mark.parametrize("values, message", [
    ({"score_layers": ("pool1",)}, "score_layers"), ({"student_taps": (1, 2)}, "student_taps"),
    ({"student_taps": (1, 2, 3, 9)}, "student_taps"), ({"input_size": 16}, "input_size"), ({"epochs": 0}, "epochs"),
])
def test_invalid_config_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(MKDConfig, values)


def test_presets_paper_is_the_official_recipe_and_quick_runs_on_lite():
    paper = make_config(MKDConfig, MKD.PRESETS["paper"])
    official = {"backbone": "vgg16", "teacher_layers": ("pool2", "pool3", "pool4", "pool5"),
                "score_layers": ("pool3", "pool4", "pool5"), "student_stages": CLONER_B, "student_pool_relu": True,
                "student_taps": (1, 2, 3, 4),
                "input_size": 128, "lam": 0.5, "lr": 1e-3, "epochs": 602, "batch_size": 64, "teacher_raw_input": True,
                "teacher_gradient": True,
                "blur_sigma": 4.0, "seed": 0}
    assert dataclasses.asdict(paper) == official and paper == MKDConfig()
    quick = make_config(MKDConfig, MKD.PRESETS["quick"])
    assert quick.backbone == "lite" and quick.epochs <= 10
    assert make_config(MKDConfig, json.loads(json.dumps(dataclasses.asdict(quick)))) == quick


def test_the_paper_preset_distils_vgg16_pool2_to_pool5_at_128(train_images, tmp_path):
    # random VGG-16 weights in the on-disk format of a user's download, loaded through the same code path
    from safetensors.torch import save_file

    from ltbench import imagenet

    weights = tmp_path / "vgg16" / "model.safetensors"
    weights.parent.mkdir()
    save_file(imagenet.vgg16_features(seed=1).state_dict(), str(weights))
    paper = {**MKD.PRESETS["paper"], "backbone": f"vgg16:{weights}", "epochs": 1, "batch_size": 2}
    detector = MKD(make_config(MKDConfig, paper)).fit(two_classes(train_images[:2], tmp_path / "checkpoints"))
    encoder = detector.image_encoder("cpu")
    assert (encoder.input_size, encoder.pixel_mean, encoder.pixel_std) == (128, 0.0, 1.0)  # raw 128×128 input
    images = train_images[2:3]
    teacher = detector._teacher_maps(images, detector.config.teacher_layers)
    student = detector._student_maps(detector.module_, images, detector.config.teacher_layers)
    shapes = [(1, 128, 32, 32), (1, 256, 16, 16), (1, 512, 8, 8), (1, 512, 4, 4)]  # notes section 9
    assert [tuple(t.shape) for t in teacher] == shapes and [tuple(s.shape) for s in student] == shapes
    scores, gradients = detector.scores_and_gradients(images, torch.tensor([0]))
    assert gradients.shape == (1, 3, 128, 128)  # the saliency is taken on the 128×128 input, as officially
    prediction = detector.predict(images, torch.tensor([0]))
    assert prediction.anomaly_maps.shape == (1, 224, 224) and float(prediction.anomaly_maps.min()) >= 0
    assert torch.equal(prediction.image_scores, scores.cpu())
