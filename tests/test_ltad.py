"""LTAD (ltad_model/): both training phases, the score of Eq. 5, every ablation switch, resume, persistence.

Everything runs on the seeded `tiny-align` backbone with a tiny reconstruction transformer and a
few epochs on structured 224×224 images of three classes, so the whole file takes well under two
minutes on one CPU core.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ltad_model import LTAD, LTADConfig, LTADWithoutSAD
from ltad_model.detector import (
    PAPER_LAMBDA,
    initial_names,
    paper_dataset,
    read_saved_names,
)
from ltad_model.diagnostics import collapse_check, report_balance
from ltad_model.model import (
    FeatureLayout,
    LTADNetwork,
    SemanticHead,
    combine_prompt_embeddings,
    derangement,
    feature_reconstruction_loss,
    kl_to_standard_normal,
)
from ltbench.detector import get_detector_class, load_training_state, make_config
from ltbench.errors import ConfigError, DetectorError
from ltbench.testing import Interrupted, TensorTrainSet, check_detector, interrupt_training, pattern_images

CLASSES = ["bottle", "metal_nut", "screw"]  # words of the tiny-align vocabulary, one with an underscore
TINY = {  # the tiny-align backbone, a 1+1-layer transformer, 2 + 2 epochs, 3 batches per epoch
    "backbone": "tiny-align", "epochs_phase1": 2, "epochs_phase2": 2, "batch_size": 4, "lr": 1e-3,
    "rm_hidden": 16, "rm_heads": 2, "rm_encoder_layers": 1, "rm_decoder_layers": 1, "rm_feedforward": 32,
    "rm_neighbor_size": 3,
}


@pytest.fixture(scope="module")
def images():
    return pattern_images(n_classes=len(CLASSES), per_class=4, seed=0)  # (12, 3, 224, 224), (12,)


def train_set(images, checkpoint_dir: Path) -> TensorTrainSet:
    return TensorTrainSet(images[0], images[1], CLASSES, checkpoint_dir)


def fit(cls, images, checkpoint_dir: Path, **overrides):
    return cls(cls.Config(**{**TINY, **overrides})).fit(train_set(images, checkpoint_dir))


@pytest.fixture(scope="module")
def fitted(images, tmp_path_factory):
    """The default LTAD (VAE, learned names from "object object", max pooling, SAD + RM) on the tiny set."""
    return fit(LTAD, images, tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def text():
    from ltbench.backbones import create

    return create("tiny-align").text


def with_config(detector: LTAD, **changes) -> LTAD:
    """The same trained network under a changed (test-time) config."""
    other = type(detector)(dataclasses.replace(detector.config, **changes))
    other.module_, other.meta_ = detector.module_, detector.meta_
    return other


def interrupt_after(monkeypatch, phase: int, epoch: int) -> None:
    """Make fit() stop (as Ctrl-C would) right after it saved the training state of (phase, epoch)."""
    interrupt_training(monkeypatch, lambda values: (values["phase"], values["epoch"]) == (phase, epoch))


def assert_same_result(a: LTAD, b: LTAD, images) -> None:
    state_a, state_b = a.module_.state_dict(), b.module_.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert a.loss_history_ == b.loss_history_
    assert a.meta_ == b.meta_
    first, second = a.predict(*images), b.predict(*images)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)
    assert torch.equal(first.image_scores, second.image_scores)


# ----------------------------------------------------------------------------- the contract


def test_check_detector_passes(images, tmp_path):
    config = LTADConfig(**TINY)
    detector = check_detector(LTAD, train_set(images, tmp_path / "ck"), config=config, work_dir=tmp_path)
    assert list(detector.meta_.class_names) == CLASSES


def test_registered_names_resolve_to_ltad_and_ltad_wo_sad():
    assert get_detector_class("ltad") is LTAD
    assert get_detector_class("ltad_wo_sad") is LTADWithoutSAD
    assert LTADWithoutSAD.Config().use_sad is False and LTAD.Config().use_sad is True


def test_presets_are_valid_and_paper_defaults_follow_the_paper():
    for values in LTAD.PRESETS.values():
        make_config(LTAD.Config, values)  # raises ConfigError if a preset is invalid
    paper = make_config(LTAD.Config, LTAD.PRESETS["paper"])
    assert (paper.backbone, paper.epochs_phase1, paper.epochs_phase2) == ("align", 100, 500)
    assert (paper.batch_size, paper.lr, paper.name_length, paper.real_probability) == (8, 1e-4, 2, 0.5)
    assert (paper.normal_prompts, paper.anomaly_prompts, paper.temperature) == (("a",), ("a broken",), 1.0)
    assert LTAD.PRESETS["quick"]["backbone"] == "lite"


@pytest.mark.parametrize("changes, fragment", [
    ({"augmentation": "gan"}, "augmentation"),
    ({"layer_pooling": "sum"}, "layer_pooling"),
    ({"name_init": "dog"}, "name_init"),
    ({"use_rm": False, "use_sad": False}, "cannot both be False"),
    ({"use_sad": False, "shuffle_names_at_test": True}, "need use_sad"),
    ({"normal_prompts": ()}, "at least one prompt"),
    ({"lambda_sem": -1.0}, "lambda_sem"),
    ({"real_probability": 1.5}, "real_probability"),
    ({"rm_neighbor_size": 14}, "rm_neighbor_size"),
])
def test_invalid_configs_are_config_errors_naming_the_field(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_config(LTADConfig, changes)


def test_prompts_from_json_lists_or_a_single_string_become_tuples():
    assert make_config(LTADConfig, {"normal_prompts": ["a", "a normal"]}).normal_prompts == ("a", "a normal")
    assert LTADConfig(anomaly_prompts="a damaged").anomaly_prompts == ("a damaged",)


def test_predict_rejects_bad_input(fitted, images):
    with pytest.raises(DetectorError, match="class_idx must lie"):
        fitted.predict(images[0][:2], torch.tensor([0, 3]))
    with pytest.raises(DetectorError, match="expects images"):
        fitted.predict(images[0][:2, :, :100], images[1][:2])


# ----------------------------------------------------------------------------- phase 1


def test_phase1_loss_falls_and_names_get_gradients(images, text, tmp_path):
    detector = fit(LTAD, images, tmp_path, epochs_phase1=5, epochs_phase2=1)
    losses = detector.loss_history_["phase1"]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0]
    # one phase-1 step by hand: the loss of Eq. 6 reaches s_c through the frozen text encoder
    network = detector.module_
    network.names.requires_grad_(True)
    network.names.grad = None
    z = torch.randn(2, detector.meta_.embed_dim)
    class_text = text.encode_soft("", network.names[torch.tensor([0, 2])])  # (2, d)
    synthetic, mean, log_variance = network.synthesize(z, class_text, torch.Generator().manual_seed(0))
    real = [torch.randn_like(m) for m in synthetic]
    loss = feature_reconstruction_loss(synthetic, real) + kl_to_standard_normal(mean, log_variance)
    loss.backward()
    grad = network.names.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and grad[1].abs().sum() == 0  # only classes used
    assert all(not p.requires_grad for p in text.model.parameters())  # T itself stays frozen


def test_decoder_synthesizes_the_real_map_shapes(fitted):
    meta = fitted.meta_
    z = torch.randn(3, meta.embed_dim)
    maps, _, _ = fitted.module_.synthesize(z, torch.randn(3, meta.text_dim), None)
    assert [tuple(m.shape) for m in maps] == [(3, c, h, w) for c, (h, w) in zip(meta.feature_channels, meta.map_sizes)]
    assert meta.map_sizes == ((112, 112), (56, 56), (28, 28), (14, 14))  # strides 2, 4, 8, 16 at 224


def test_names_learn_in_phase1_and_stay_frozen_in_phase2(fitted, images, text, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, phase=1, epoch=TINY["epochs_phase1"])
    with pytest.raises(Interrupted):
        fit(LTAD, images, tmp_path)
    after_phase1 = load_training_state(tmp_path)["state:model"]["names"]
    init = initial_names(text, CLASSES, "object", 2, 0)
    assert not torch.equal(after_phase1, init)  # learned in phase 1
    assert torch.equal(fitted.module_.names.detach(), after_phase1)  # untouched by phase 2
    assert not fitted.module_.names.requires_grad


def test_fixed_names_stay_at_their_initialisation(images, text, tmp_path):
    detector = fit(LTAD, images, tmp_path, learn_names=False, name_init="classname")
    assert torch.equal(detector.module_.names.detach(), initial_names(text, CLASSES, "classname", 2, 0))
    assert detector.loss_history_["phase1"][-1] < detector.loss_history_["phase1"][0]  # the VAE still learns


def test_name_initialisations(text):
    obj = initial_names(text, CLASSES, "object", 2, 0)
    assert obj.shape == (3, 2, text.token_dim)
    assert torch.equal(obj[0, 0], text.word_embeddings("object")[0]) and torch.equal(obj[0], obj[2])
    named = initial_names(text, CLASSES, "classname", 2, 0)
    # "metal_nut" -> "metal nut" (2 tokens); "bottle" (1 token) is followed by "object"
    assert torch.equal(named[1], text.word_embeddings("metal nut"))
    assert torch.equal(named[0], torch.cat([text.word_embeddings("bottle"), text.word_embeddings("object")]))
    longer = initial_names(text, ["toothbrush", "pcb1"], "classname", 2, 0)  # pcb1 needs 4 word pieces
    assert longer.shape[1] == len(text.word_embeddings("pcb1")) > 2
    random_a, random_b = initial_names(text, CLASSES, "random", 3, 7), initial_names(text, CLASSES, "random", 3, 7)
    assert random_a.shape == (3, 3, text.token_dim) and torch.equal(random_a, random_b)
    assert not torch.equal(random_a[0], random_a[1])


def test_name_length_sets_the_tokens_of_s_c(images, tmp_path):
    detector = fit(LTAD, images, tmp_path, name_length=3, epochs_phase1=1, epochs_phase2=1)
    assert tuple(detector.module_.names.shape[:2]) == (3, 3) and detector.meta_.name_length == 3


def test_autoencoder_augmentation_is_deterministic_and_has_no_kl(images, tmp_path, fitted):
    detector = fit(LTAD, images, tmp_path, augmentation="ae", epochs_phase1=1, epochs_phase2=1)
    network = detector.module_
    assert network.latent.log_variance is None  # no F_σ
    z, t = torch.randn(2, detector.meta_.embed_dim), torch.randn(2, detector.meta_.text_dim)
    first, _, log_variance = network.synthesize(z, t, torch.Generator().manual_seed(0))
    second, _, _ = network.synthesize(z, t, torch.Generator().manual_seed(1))
    assert log_variance is None and all(torch.equal(a, b) for a, b in zip(first, second))
    vae_first, _, _ = fitted.module_.synthesize(z, t, torch.Generator().manual_seed(0))
    vae_second, _, _ = fitted.module_.synthesize(z, t, torch.Generator().manual_seed(1))
    assert not torch.equal(vae_first[0], vae_second[0])  # the VAE samples ẑ


# ----------------------------------------------------------------------------- phase 2


def test_phase2_loss_falls(images, tmp_path):
    detector = fit(LTAD, images, tmp_path, epochs_phase1=1, epochs_phase2=6)
    losses = detector.loss_history_["phase2"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]


def count_synthesis(monkeypatch) -> list[int]:
    calls = [0]
    original = LTADNetwork.synthesize

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LTADNetwork, "synthesize", counted)
    return calls


@pytest.mark.parametrize("augmentation, synthesises", [("vae", True), ("none", False)])
def test_phase2_uses_synthetic_features_unless_augmentation_is_none(images, tmp_path, monkeypatch,
                                                                    augmentation, synthesises):
    calls = count_synthesis(monkeypatch)
    fit(LTAD, images, tmp_path, augmentation=augmentation, epochs_phase1=1, epochs_phase2=3)
    phase1_calls = 3 + 1  # 12 images, batch 4, one epoch; and the epoch's collapse check
    assert (calls[0] > phase1_calls) is synthesises


def test_real_probability_one_never_synthesises(images, tmp_path, monkeypatch):
    calls = count_synthesis(monkeypatch)
    fit(LTAD, images, tmp_path, real_probability=1.0, epochs_phase1=1, epochs_phase2=2)
    assert calls[0] == 3 + 1  # phase 1's three batches and its collapse check only


def test_distribution_aware_sampling_favours_small_classes():
    counts = [4, 4, 2]
    uniform = LTAD(LTADConfig())._sampling_probabilities(counts)
    assert torch.allclose(uniform, torch.full((3,), 0.5))
    aware = LTAD(LTADConfig(distribution_aware_sampling=True))._sampling_probabilities(counts)
    assert aware[2] > aware[0] == aware[1]
    assert torch.allclose(aware * torch.tensor([4.0, 4.0, 2.0]), torch.full((3,), aware[0] * 4))  # ∝ 1 / n_c
    assert abs(float((aware * torch.tensor(counts)).sum()) / sum(counts) - 0.5) < 1e-6  # mean 1 − p_c kept
    assert torch.equal(LTAD(LTADConfig(augmentation="none"))._sampling_probabilities(counts), torch.zeros(3))


def test_semantic_scores_lie_in_unit_interval_and_depend_on_the_class(fitted, images):
    scores = fitted.semantic_scores(*images)  # (12, 196)
    assert scores.shape == (12, 196) and float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    huge = fitted.module_.semantic_logits(torch.randn(2, 196, sum(fitted.meta_.feature_channels)) * 1e6,
                                          torch.tensor([0, 1]), fitted.config)
    assert bool(((torch.sigmoid(huge) >= 0) & (torch.sigmoid(huge) <= 1)).all())
    other_class = fitted.semantic_scores(images[0], (images[1] + 1) % 3)
    assert not torch.equal(scores, other_class)


@torch.no_grad()
def test_temperature_and_patch_normalisation_act_on_the_logit(fitted):
    tokens = torch.randn(2, 196, sum(fitted.meta_.feature_channels)) * 100
    class_idx = torch.tensor([0, 2])
    logits = fitted.module_.semantic_logits(tokens, class_idx, fitted.config)
    halved = fitted.module_.semantic_logits(tokens, class_idx, dataclasses.replace(fitted.config, temperature=2.0))
    assert torch.allclose(halved, logits / 2)
    unit = fitted.module_.semantic_logits(tokens, class_idx, dataclasses.replace(fitted.config, normalize_patches=True))
    bound = float((fitted.module_.text_anomaly - fitted.module_.text_normal).norm(dim=-1).max())
    assert float(unit.abs().max()) <= bound + 1e-6  # |(t_a − t_n)·p̂| ≤ ‖t_a − t_n‖ for a unit p̂
    assert not torch.allclose(unit, logits)


def test_score_is_s_rec_plus_lambda_s_sem(fitted, images):
    """Eq. 5, checked through predict: the map with λ minus the map with λ = 0 is λ·S_sem upsampled."""
    assert fitted.meta_.lambda_rule == "training range" and fitted.meta_.lambda_sem > 0
    without = with_config(fitted)
    without.meta_ = dataclasses.replace(fitted.meta_, lambda_sem=0.0)
    difference = fitted.predict(*images).anomaly_maps - without.predict(*images).anomaly_maps
    semantic = fitted.semantic_scores(*images).view(-1, 1, 14, 14)
    expected = fitted.meta_.lambda_sem * F.interpolate(semantic, size=(224, 224), mode="bilinear",
                                                          align_corners=True)[:, 0]
    assert torch.allclose(difference, expected, rtol=1e-4, atol=1e-3 * fitted.meta_.lambda_sem)


def test_lambda_comes_from_config_or_the_paper_dataset():
    assert paper_dataset(json.loads(Path(__file__).parent.parent.joinpath(
        "ltbench/data_files/paper/class_orders.json").read_text())["mvtec"]) == "mvtec"
    assert paper_dataset(["Class1", "Class2"]) is None
    assert PAPER_LAMBDA == {"mvtec": 500.0, "visa": 400.0, "dagm": 300.0}


def test_without_sad_equals_lambda_zero(images, tmp_path):
    without_sad = fit(LTADWithoutSAD, images, tmp_path / "a")
    lambda_zero = fit(LTAD, images, tmp_path / "b", lambda_sem=0.0)
    assert without_sad.module_.semantic is None and lambda_zero.meta_.lambda_rule == "config"
    first, second = without_sad.predict(*images), lambda_zero.predict(*images)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)
    assert torch.equal(first.image_scores, second.image_scores)


def test_without_rm_the_map_is_the_upsampled_s_sem(images, tmp_path):
    detector = fit(LTAD, images, tmp_path, use_rm=False)
    assert detector.module_.reconstruction is None
    maps = detector.predict(*images).anomaly_maps
    semantic = detector.semantic_scores(*images).view(-1, 1, 14, 14)  # (B, 1, g, g) in [0, 1]
    expected = F.interpolate(semantic, size=(224, 224), mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(maps, expected, atol=1e-6)


def test_s_rec_only_scoring_equals_ltad_wo_sad_on_the_same_weights(fitted, images):
    rec_only = with_config(fitted, score="rec").predict(*images).anomaly_maps
    fields = {f.name: getattr(fitted.config, f.name) for f in dataclasses.fields(fitted.config) if f.name != "use_sad"}
    without = LTADWithoutSAD(LTADWithoutSAD.Config(**fields))
    without.meta_ = fitted.meta_
    without.module_ = without.build_module(fitted.meta_)
    missing, unexpected = without.module_.load_state_dict(fitted.module_.state_dict(), strict=False)
    assert not missing and all(key.startswith("semantic.") for key in unexpected)
    assert torch.equal(without.predict(*images).anomaly_maps, rec_only)
    # S_rec itself, directly: ‖Π(p) − p‖² per patch (Eq. 1, squared), bilinear to 224 with align_corners
    with torch.no_grad():
        tokens = fitted._test_tokens(images[0], torch.device("cpu"))
        direct = (fitted.module_.reconstruction(tokens) - tokens).pow(2).sum(-1).view(-1, 1, 14, 14)
    expected = F.interpolate(direct, size=(224, 224), mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(rec_only, expected, rtol=1e-5, atol=1e-5)
    # and S = S_rec + λ·S_sem: the full map minus the S_rec-only map is λ times the S_sem-only map
    sem_only = with_config(fitted, score="sem").predict(*images).anomaly_maps
    full = fitted.predict(*images).anomaly_maps
    assert torch.allclose(full - rec_only, fitted.meta_.lambda_sem * sem_only, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="score='sem' needs"):
        LTADWithoutSAD.Config(score="sem")


def test_eq6_loss_sums_squared_errors_per_image_and_kl_over_latent_dimensions():
    generator = torch.Generator().manual_seed(0)
    synthetic = [torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 5, 2, 2, generator=generator)]
    real = [torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 5, 2, 2, generator=generator)]
    mean, log_variance = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    per_layer = []
    for fake, target in zip(synthetic, real):  # Σ over a layer's elements, per image, then the batch mean
        per_layer.append(sum(float(((fake[b] - target[b]) ** 2).sum()) for b in range(3)) / 3)
    assert float(feature_reconstruction_loss(synthetic, real)) == pytest.approx(sum(per_layer) / 2, rel=1e-6)
    elements = [sum(float(((f[b] - t[b]) ** 2).mean()) for b in range(3)) / 3 for f, t in zip(synthetic, real)]
    assert float(feature_reconstruction_loss(synthetic, real, "mean")) == pytest.approx(sum(elements) / 2, rel=1e-6)
    kl = [sum(0.5 * (float(mean[b, d]) ** 2 + float(log_variance[b, d].exp()) - 1 - float(log_variance[b, d]))
              for d in range(6)) for b in range(3)]
    assert float(kl_to_standard_normal(mean, log_variance)) == pytest.approx(sum(kl) / 3, rel=1e-6)
    assert float(kl_to_standard_normal(mean, log_variance, "mean")) == pytest.approx(sum(kl) / 18, rel=1e-6)
    assert LTADConfig().phase1_loss == "sum"  # Eq. 6 as printed is the default


def test_lambda_balance_is_saved_reported_and_warned(fitted, caplog):
    meta = fitted.meta_
    assert meta.rec_spread > 0 and 0 < meta.sem_spread <= 1
    diagnostics = fitted.diagnostics_
    assert diagnostics["lambda_balance"] == pytest.approx(meta.lambda_sem * meta.sem_spread / meta.rec_spread)
    assert {"rec_spread", "sem_spread", "lambda_sem", "spread"} <= set(diagnostics)
    with caplog.at_level(logging.INFO, logger="ltbench.model"):
        report_balance(dataclasses.replace(meta, lambda_sem=0.001 * meta.rec_spread / meta.sem_spread))
        report_balance(dataclasses.replace(meta, lambda_sem=meta.rec_spread / meta.sem_spread))
    warning, info = caplog.records[-2], caplog.records[-1]
    assert warning.levelno == logging.WARNING and "S_sem barely moves the ranking" in warning.getMessage()
    assert info.levelno == logging.INFO and "λ·spread(S_sem)/spread(S_rec) = 1" in info.getMessage()


def test_collapse_check_logs_kl_active_units_and_the_class_mean_reference(fitted, images, text, tmp_path, caplog):
    data = fitted.encode_training_set(train_set(images, tmp_path))
    class_text = text.encode_soft("", fitted.module_.names.detach())
    with caplog.at_level(logging.INFO, logger="ltbench.model"):
        result = collapse_check(fitted.module_, data, class_text, torch.device("cpu"), epoch=0, seed=1)
    assert result["kl_per_dim"] > 0 and 0 <= result["active_units"] <= fitted.meta_.embed_dim
    # the class-mean reference, computed directly: each image's class mean over the sample
    real = [m.float() for m in data.maps]
    expected = []
    for layer in real:
        means = torch.stack([layer[data.class_idx == c].mean(0) for c in data.class_idx.tolist()])
        expected.append(float(((means - layer) ** 2).mean()))
    assert result["mse_class_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert "phase 1 epoch 1:" in caplog.records[-1].getMessage() and "class mean vs real" in caplog.records[-1].getMessage()


def test_shuffled_names_change_predictions_but_not_s_rec(fitted, images):
    shuffled = with_config(fitted, shuffle_names_at_test=True)
    assert not torch.equal(fitted.predict(*images).anomaly_maps, shuffled.predict(*images).anomaly_maps)
    # the shuffled model scores class c with the classifier of class c + 1
    assert torch.equal(shuffled.semantic_scores(*images), fitted.semantic_scores(images[0], (images[1] + 1) % 3))
    permutation = derangement(5)
    assert sorted(permutation.tolist()) == list(range(5)) and bool((permutation != torch.arange(5)).all())


def test_shuffling_needs_two_classes(images, tmp_path):
    one_class = TensorTrainSet(images[0][:4], torch.zeros(4, dtype=torch.int64), ["bottle"], tmp_path)
    with pytest.raises(DetectorError, match="at least 2 classes"):
        LTAD(LTADConfig(**TINY, shuffle_names_at_test=True)).fit(one_class)


def test_no_text_encoder_learns_free_classifier_weights(images, tmp_path):
    detector = fit(LTAD, images, tmp_path, no_text_encoder=True)
    network = detector.module_
    assert network.free_classifier is not None and tuple(network.free_classifier.shape) == (3, 2, 80)
    torch.manual_seed(detector.config.seed)  # the initialisation fit starts from (it seeds, then builds the network)
    initial = LTADNetwork(detector._layout(detector.meta_), detector.config).free_classifier
    assert float((network.free_classifier - initial).detach().abs().max()) > 1e-4  # training moved the free weights
    assert float(network.text_normal.abs().sum()) == 0.0  # T([v; s_c]) is never used
    scores = detector.semantic_scores(*images)
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0


def test_layer_pooling_max_mean_and_concat():
    torch.manual_seed(0)
    head = SemanticHead((4, 6), 5, "max")
    tokens = torch.randn(2, 9, 10)
    mean = SemanticHead((4, 6), 5, "mean")
    mean.load_state_dict(head.state_dict())
    parts = [phi(t) for phi, t in zip(head.projections, tokens.split((4, 6), dim=-1))]
    assert torch.equal(head(tokens), torch.maximum(parts[0], parts[1]))
    assert torch.allclose(mean(tokens), (parts[0] + parts[1]) / 2)
    concat = SemanticHead((4, 6), 5, "concat")
    assert len(concat.projections) == 1 and concat.projections[0].in_features == 10
    assert concat(tokens).shape == (2, 9, 5)


def test_prompt_ensemble_averages_normalised_prompt_embeddings(fitted, text):
    single = combine_prompt_embeddings(torch.tensor([[[3.0, 4.0]]]), normalize=True)
    assert torch.allclose(single, torch.tensor([[0.6, 0.8]]))
    ensemble = with_config(fitted, anomaly_prompts=("a broken", "a damaged"))
    network = LTADNetwork(ensemble._layout(fitted.meta_), ensemble.config)
    network.load_state_dict(fitted.module_.state_dict())
    ensemble._set_text_classifier(network, text)
    names = fitted.module_.names.detach()
    each = torch.stack([F.normalize(text.encode_soft(p, names), dim=-1) for p in ("a broken", "a damaged")])
    assert torch.allclose(network.text_anomaly, F.normalize(each.mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(network.text_normal, fitted.module_.text_normal)
    assert not torch.allclose(network.text_anomaly, fitted.module_.text_anomaly)


def test_layout_token_channels():
    layout = FeatureLayout((8, 8, 16, 32), ((112, 112), (56, 56), (28, 28), (14, 14)), 80, 80, 32, 3, 2, 14)
    assert layout.token_channels == 64


# ----------------------------------------------------------------------------- resume and persistence


@pytest.mark.parametrize("phase, epoch", [(1, 1), (2, 1)])
def test_resume_after_an_interruption_gives_the_same_result(fitted, images, tmp_path, monkeypatch, phase, epoch):
    interrupt_after(monkeypatch, phase, epoch)
    with pytest.raises(Interrupted):
        fit(LTAD, images, tmp_path)
    assert load_training_state(tmp_path)["phase"] == phase
    monkeypatch.undo()
    resumed = fit(LTAD, images, tmp_path)
    assert_same_result(resumed, fitted, images)


def test_a_checkpoint_of_another_config_is_refused(images, tmp_path):
    fit(LTAD, images, tmp_path, epochs_phase1=1, epochs_phase2=1)
    with pytest.raises(DetectorError, match="another model, config or split"):
        fit(LTAD, images, tmp_path, epochs_phase1=1, epochs_phase2=1, lr=2e-3)


def test_save_load_gives_identical_predictions_and_meta(fitted, images, tmp_path):
    fitted.save(tmp_path / "model")
    loaded = LTAD.load(tmp_path / "model")
    assert loaded.meta_ == fitted.meta_ and loaded.config == fitted.config
    first, second = fitted.predict(*images), loaded.predict(*images)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps) and torch.equal(first.image_scores, second.image_scores)
    meta = json.loads((tmp_path / "model" / "config.json").read_text())["meta"]
    assert meta["class_names"] == CLASSES and meta["backbone"] == "tiny-align" and len(meta["backbone_digest"]) == 64
    assert meta["feature_channels"] == [8, 8, 16, 32]


def test_inspect_names_prints_nearest_tokens_per_class(fitted, tmp_path):
    from ltbench.cli import main

    fitted.save(tmp_path / "run" / "model")
    _, _, names = read_saved_names(tmp_path / "run" / "model")
    assert torch.equal(names, fitted.module_.names.detach())
    result = CliRunner().invoke(main, ["inspect-names", str(tmp_path / "run"), "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in CLASSES:
        assert name in lines
    token_lines = [line for line in lines if line.startswith("  s_c[")]
    assert len(token_lines) == 3 * 2 and all(line.count(",") == 1 for line in token_lines)
    assert "object" in token_lines[0]  # names start at "object object" and move little in 2 epochs
    assert fitted.name_neighbours(1)["bottle"][0][0][0] == "object"


def test_inspect_names_rejects_a_folder_without_a_model(tmp_path):
    from ltbench.cli import main

    result = CliRunner().invoke(main, ["inspect-names", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("Error:") and "run directory" in result.output
