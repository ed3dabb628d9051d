"""The detector contract: registry, --set parsing, training state, and the `check_detector` conformance check."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch

from ltbench.detector import (
    BUILTIN_DETECTORS,
    Prediction,
    check_prediction,
    get_detector_class,
    known_detectors,
    load_training_state,
    make_config,
    parse_set_values,
    resolve_detector,
    save_training_state,
    validate_detector_class,
)
from ltbench.errors import ConfigError, DetectorError
from ltbench.testing import TensorTrainSet, check_detector, pattern_images

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))  # `tests.mean_detector` is importable as a target, as a user's module would be
from tests.mean_detector import MeanConfig, MeanDetector, NoSaveDetector

MEAN = "tests.mean_detector:MeanDetector"


@pytest.fixture(scope="module")
def batch():
    return pattern_images(n_classes=2, per_class=3, seed=0)  # (6, 3, 224, 224), (6,)


def train_set(batch, tmp_path, names=("left", "right")) -> TensorTrainSet:
    return TensorTrainSet(batch[0], batch[1], list(names), tmp_path / "checkpoints")


# ----------------------------------------------------------------------------- registry


def test_builtin_names_and_unknown_model_lists_them():
    assert {"uniad", "ltad", "ltad_wo_sad"} <= set(known_detectors())
    assert known_detectors()["ltad"] == BUILTIN_DETECTORS["ltad"]
    with pytest.raises(DetectorError) as error:
        resolve_detector("ltda")
    known = ", ".join(sorted(known_detectors()))
    assert str(error.value) == f"unknown model 'ltda'; known models: {known} (or give package.module:ClassName)"


def test_target_resolves_and_a_registered_target_gets_its_name():
    spec = resolve_detector(MEAN)
    assert spec.cls is MeanDetector and spec.name == MEAN and spec.directory_name == "tests.mean_detector.MeanDetector"
    assert get_detector_class(MEAN) is MeanDetector
    uniad = resolve_detector(BUILTIN_DETECTORS["uniad"])
    assert uniad.name == "uniad" and uniad.cls is get_detector_class("uniad")


def test_import_failures_say_what_is_wrong():
    with pytest.raises(DetectorError, match="cannot import module 'no_such_module_xyz'"):
        resolve_detector("no_such_module_xyz:Model")
    with pytest.raises(DetectorError, match="module 'tests.mean_detector' has no class 'Nope'"):
        resolve_detector("tests.mean_detector:Nope")
    with pytest.raises(DetectorError, match="must look like package.module:ClassName"):
        resolve_detector("tests.mean_detector:")


def test_entry_point_plugins_are_registered(tmp_path, monkeypatch):
    dist = tmp_path / "ltbench_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ltbench-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[ltbench.detectors]\nmeanie = {MEAN}\nltad = {MEAN}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = known_detectors()
    assert registry["meanie"] == MEAN
    assert registry["ltad"] == BUILTIN_DETECTORS["ltad"]  # a plugin cannot shadow a built-in
    spec = resolve_detector("meanie")
    assert spec.cls is MeanDetector and spec.name == "meanie" and spec.target == MEAN
    assert resolve_detector(MEAN).name == "meanie"  # the target is known under the plugin's name


def test_a_class_missing_a_member_is_named():
    with pytest.raises(DetectorError, match="does not meet the contract: missing 'save'"):
        resolve_detector("tests.mean_detector:NoSaveDetector")
    with pytest.raises(DetectorError, match="missing 'save'"):
        validate_detector_class(NoSaveDetector)

    class PlainLoad(MeanDetector):
        def load(self, directory):  # an instance method, not a classmethod
            return self

    with pytest.raises(DetectorError, match="'load' must be a classmethod"):
        validate_detector_class(PlainLoad)

    class DictConfig(MeanDetector):
        Config = dict

    with pytest.raises(DetectorError, match="Config must be a dataclass"):
        validate_detector_class(DictConfig)
    with pytest.raises(DetectorError, match="is not a class"):
        validate_detector_class(MeanDetector(MeanConfig()))


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Typed:
    flag: bool = False
    count: int = 1
    rate: float = 0.1
    name: str = "x"
    layers: tuple[int, ...] = (3, 10)
    pair: tuple[str, float] = ("a", 1.0)
    limit: float | None = None
    width: int | None = None
    mode: Literal["max", "mean"] = "max"
    path: Path = Path("here")


def test_set_values_are_parsed_to_the_field_types():
    values = parse_set_values(Typed, ["flag=yes", "count=7", "rate=2e-3", "name=a=b", "layers=3,10,17",
                                      "pair=[b, 2.5]", "limit=none", "width=64", "mode=mean", "path=/tmp/p"])
    assert values == {"flag": True, "count": 7, "rate": 0.002, "name": "a=b", "layers": (3, 10, 17),
                      "pair": ("b", 2.5), "limit": None, "width": 64, "mode": "mean", "path": Path("/tmp/p")}
    assert parse_set_values(Typed, ["flag=false", "limit=0.5", "layers="]) == {"flag": False, "limit": 0.5,
                                                                             "layers": ()}
    assert make_config(Typed, values) == Typed(**values)


@pytest.mark.parametrize("assignment, message", [
    ("size=3", ("unknown --set key 'size' for Typed; valid keys: count, flag, layers, limit, mode, name, pair, path, "
               "rate, width")),
    ("count=3.5", "--set count='3.5': expected an integer (int)"),
    ("flag=maybe", "--set flag='maybe': expected true or false (bool)"),
    ("mode=median", "--set mode='median': expected one of max, mean"),
    ("pair=a", "--set pair='a': expected 2 comma-separated values"),
    ("count", "--set 'count' must look like key=value"),
])
def test_bad_set_values(assignment, message):
    with pytest.raises(ConfigError) as error:
        parse_set_values(Typed, [assignment])
    assert str(error.value).startswith(message)


def test_make_config_turns_json_lists_into_tuples_and_rejects_unknown_keys():
    config = make_config(Typed, json.loads('{"layers": [1, 2], "pair": ["z", 3]}'))
    assert config.layers == (1, 2) and config.pair == ("z", 3) and hash(config)
    with pytest.raises(ConfigError, match="unknown config key 'colour' for Typed; valid keys: count, flag"):
        make_config(Typed, {"colour": 1})


# ----------------------------------------------------------------------------- training state


def test_training_state_round_trip_restores_the_random_generator(tmp_path):
    torch.manual_seed(3)
    state = {"epoch": 4, "weights": torch.arange(6.0).view(2, 3), "losses": [0.5, 0.25]}
    save_training_state(tmp_path, state)
    expected = torch.rand(5)  # what an uninterrupted run draws next
    torch.manual_seed(99)
    loaded = load_training_state(tmp_path)
    assert loaded["epoch"] == 4 and loaded["losses"] == [0.5, 0.25] and torch.equal(loaded["weights"], state["weights"])
    assert torch.equal(torch.rand(5), expected)
    assert load_training_state(tmp_path / "empty") is None
    (tmp_path / "training_state.pt").write_bytes(b"broken")
    with pytest.raises(DetectorError, match="cannot read the training state"):
        load_training_state(tmp_path)


def test_check_prediction_reports_shapes_dtypes_and_values():
    maps = torch.zeros(2, 224, 224)
    scores, out = check_prediction(Prediction(torch.zeros(2), maps), 2, "M")
    assert scores.shape == (2,) and out.shape == (2, 224, 224)
    with pytest.raises(DetectorError, match=r"M.predict: anomaly_maps must be a tensor of shape \(2, 224, 224\) or None; "
                                            r"got \(2, 112, 112\)"):
        check_prediction(Prediction(torch.zeros(2), torch.zeros(2, 112, 112)), 2, "M")
    with pytest.raises(DetectorError, match=r"image_scores must be a tensor of shape \(2,\)"):
        check_prediction(Prediction(torch.zeros(3), maps), 2, "M")
    with pytest.raises(DetectorError, match="image_scores must be floating point"):
        check_prediction(Prediction(torch.zeros(2, dtype=torch.int64), maps), 2, "M")
    with pytest.raises(DetectorError, match="anomaly_maps holds NaN or infinite values"):
        check_prediction(Prediction(torch.zeros(2), torch.full((2, 224, 224), float("nan"))), 2, "M")
    with pytest.raises(DetectorError, match="must return a Prediction; got tuple"):
        check_prediction((maps, maps), 2, "M")


# ----------------------------------------------------------------------------- check_detector


def test_check_detector_passes_for_a_detector_written_against_the_contract(batch, tmp_path):
    detector = check_detector(MeanDetector, train_set(batch, tmp_path), work_dir=tmp_path)
    assert isinstance(detector, MeanDetector) and detector.means_.shape == (2, 3, 16, 16)
    assert json.loads((tmp_path / "checkpoints" / "progress.json").read_text()) == {"epochs_done": 2}


@dataclass
class MutableConfig:
    epochs: int = 1
    grid: int = 16
    batch_size: int = 4


@dataclass(frozen=True)
class NoDefaultConfig:
    epochs: int
    grid: int = 16
    batch_size: int = 4


class Unfrozen(MeanDetector):
    Config = MutableConfig


class NoDefault(MeanDetector):
    Config = NoDefaultConfig


class ForgetsConfig(MeanDetector):
    def __init__(self, config):
        self.config = dataclasses.replace(config)  # a copy, not the config it was given


class PredictsUnfitted(MeanDetector):
    def predict(self, images, class_idx):
        if not hasattr(self, "means_"):
            return Prediction(torch.zeros(len(images)), torch.zeros(len(images), 224, 224))
        return super().predict(images, class_idx)


class WrongError(MeanDetector):
    def predict(self, images, class_idx):
        if not hasattr(self, "means_"):
            raise AttributeError("means_")
        return super().predict(images, class_idx)


class ReturnsNone(MeanDetector):
    def fit(self, train):
        super().fit(train)


class SmallMaps(MeanDetector):
    def predict(self, images, class_idx):
        prediction = super().predict(images, class_idx)
        return Prediction(prediction.image_scores, prediction.anomaly_maps[:, ::2, ::2])


class Noisy(MeanDetector):
    def predict(self, images, class_idx):
        prediction = super().predict(images, class_idx)
        return Prediction(prediction.image_scores + torch.rand(len(images)), prediction.anomaly_maps)


class Pickles(MeanDetector):
    def save(self, directory):
        super().save(directory)
        torch.save({"means": self.means_}, Path(directory) / "extra.pt")


class Lenient(MeanDetector):
    @classmethod
    def load(cls, directory):
        from safetensors.torch import load_file

        payload = json.loads((Path(directory) / "config.json").read_text())
        detector = cls(MeanConfig(**payload["config"]))
        detector.means_ = load_file(str(Path(directory) / "model.safetensors"))["means"]
        detector.class_names_ = payload["class_names"]
        return detector


class Forgetful(MeanDetector):
    @classmethod
    def load(cls, directory):
        detector = super().load(directory)
        detector.means_ = torch.zeros_like(detector.means_)
        return detector


@pytest.mark.parametrize("cls, message", [
    (Unfrozen, "Config must be a frozen dataclass"),
    (NoDefault, "every Config field needs a default; epochs has none"),
    (ForgetsConfig, "__init__(config) must store the config it is given"),
    (PredictsUnfitted, "predict before fit returned a result; it must raise DetectorError"),
    (WrongError, "predict before fit raised AttributeError (means_); it must raise DetectorError"),
    (ReturnsNone, "fit() must return self"),
    (SmallMaps, "SmallMaps.predict: anomaly_maps must be a tensor of shape (4, 224, 224) or None; got (4, 112, 112)"),
    (Noisy, "predict() gives different results for the same input"),
    (Pickles, "save() may write only JSON and safetensors files (no pickle); also wrote ['extra.pt']"),
    (Lenient, "load() accepted a model directory with an unknown key in config.json; load must be strict"),
    (Forgetful, "a saved and loaded detector predicts differently from the original"),
])
def test_check_detector_names_each_broken_rule(cls, message, batch, tmp_path):
    with pytest.raises(DetectorError) as error:
        check_detector(cls, train_set(batch, tmp_path), config=MeanConfig(epochs=1), work_dir=tmp_path)
    assert f"{cls.__qualname__} fails the detector contract: {message}" in str(error.value)


# Small settings for the built-in detectors, applied where their Config has the field.
TINY_FIELDS = {
    "backbone": "tiny-align", "epochs": 1, "epochs_phase1": 1, "epochs_phase2": 1, "batch_size": 4,
    "hidden": 16, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "feedforward": 32, "neighbor_size": 3,
    "rm_hidden": 16, "rm_heads": 2, "rm_encoder_layers": 1, "rm_decoder_layers": 1, "rm_feedforward": 32,
    "rm_neighbor_size": 3,
    "reconstructive_width": 4, "discriminative_width": 4, "input_size": 64, "generated_textures": 8,  # DRAEM
    "support_draws": 1,  # RegAD
}

# Per detector, where the generic small settings do not fit its layer names or backbones.
TINY_PER_DETECTOR = {
    "patchcore": {"feature_layers": ("block2", "block4"), "coreset_fraction": 0.01},  # tiny-align strides 8 and 16
    "mkd": {"teacher_layers": ("block2", "block4"), "score_layers": ("block4",), "student_stages": ((8, 16), (8, 32)),
            "student_taps": (0, 1), "student_pool_relu": False, "input_size": 56, "teacher_raw_input": False,
            "teacher_gradient": False},
    "regad": {"backbone": "tiny"},
    "cutpaste": {"pretrained": False, "width": 8, "image_size": 64, "steps": 2},  # a tiny ResNet-18, from scratch
}


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LTBENCH_HOME", str(tmp_path / "home"))  # the feature cache stays in the test folder


@pytest.mark.parametrize("name", sorted(known_detectors()))
def test_every_registered_detector_passes_check_detector(name, tmp_path, isolated_home):
    cls = get_detector_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    values = {k: v for k, v in TINY_FIELDS.items() if k in fields} | TINY_PER_DETECTOR.get(name, {})
    config = make_config(cls.Config, values)
    images, class_idx = pattern_images(n_classes=3, per_class=4, seed=1)
    # class names from the tiny-align vocabulary (detectors with a text encoder read them)
    train = TensorTrainSet(images, class_idx, ["bottle", "metal_nut", "screw"], tmp_path / "checkpoints")
    detector = check_detector(cls, train, config=config, work_dir=tmp_path)
    assert detector.config == config


def test_the_readme_example_is_a_complete_detector(batch, tmp_path, monkeypatch):
    text = (TESTS.parent / "README.md").read_text()
    code = text.split("## Add your own detector", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) < 40
    (tmp_path / "readme_detector.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = resolve_detector("readme_detector:MeanImage")
    detector = check_detector(spec.cls, train_set(batch, tmp_path), work_dir=tmp_path)
    assert detector.means_.shape == (2, 3, 28, 28)
