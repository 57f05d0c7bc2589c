"""The one params schema: every knob of every stage, validated once for every entry point.

`params.yaml` is the committed default; `section.key=value` overrides (the same syntax as
`dvc exp run -S`) are applied on top, then the whole tree is validated. This module imports no
TensorFlow, so a bad value is reported in well under two seconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import UserError

CASSAVA_CLASSES = ("cbb", "cbsd", "cgm", "cmd", "healthy")
DEFAULT_PARAMS_FILE = "params.yaml"


class ParamsError(UserError, ValueError):
    """A params file or override is invalid; the message is one line naming key, value and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must never fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
# NumPy's and TensorFlow's generators take seeds in [0, 2**32): a negative one would fail deep inside a stage.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class SyntheticParams(_Section):
    """The embedded, procedurally generated cassava-like leaf data set."""

    images_per_class: PositiveInt | dict[str, PositiveInt] = 200
    blur_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    render_size: Annotated[int, Field(ge=32, le=512)] = 96


class DataParams(_Section):
    source: Literal["synthetic", "digits", "folder", "csv"] = "synthetic"
    root: str | None = None  # folder / csv: the local data set (relative to the repository root)
    image_size: Annotated[int, Field(ge=8, le=512)] = 64
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15
    seed: Seed = 42
    min_images_per_class: Annotated[int, Field(ge=3)] = 10
    small_class_policy: Literal["error", "drop"] = "error"
    min_image_side: Annotated[int, Field(ge=1)] = 8  # images with a shorter side are skipped as too small
    large_image_megapixels: Annotated[float, Field(gt=0.0)] = 40.0  # larger ones are kept but flagged
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _check(self) -> "DataParams":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g}: "
                "must be < 0.9 so training keeps data"
            )
        if self.source in ("folder", "csv") and not self.root:
            raise ValueError(f"data.root is required when data.source = {self.source!r} (a local folder)")
        return self


Initializer = Literal[
    "glorot_uniform", "glorot_normal", "he_normal", "he_uniform", "lecun_normal", "orthogonal",
    "random_normal", "zeros",  # deliberately bad, for ablations (lesson 1)
]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


class AugmentationParams(_Section):
    """Random training-time augmentation layers (inactive at inference); 0 / "none" switches one off."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # fraction of a full turn, as keras RandomRotation
    zoom: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    contrast: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    brightness: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


# Keras applications usable as `model.backbone`; every one takes images of at least 32 x 32 pixels.
BACKBONE_APPLICATIONS = ("mobilenet_v2", "efficientnet_b0", "resnet50_v2")
MIN_BACKBONE_IMAGE_SIZE = 32
MLFLOW_SOURCE_PREFIXES = ("runs:/", "models:/")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_path(value: str) -> Path:
    """A params path: absolute, or relative to the workspace (the repository root by default)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else workspace_root() / path


def is_mlflow_source(weights: str) -> bool:
    """`runs:/<id>/<path>`, `models:/<name>@<alias>` / `models:/<name>/<version>`, or a bare run id."""
    return weights.startswith(MLFLOW_SOURCE_PREFIXES) or bool(_RUN_ID.match(weights))


def _check_backbone(backbone: str) -> str:
    if backbone in ("none", *BACKBONE_APPLICATIONS):
        return backbone
    if not backbone.endswith(".keras"):
        raise ValueError(
            f"model.backbone = {backbone!r}: expected none, {', '.join(BACKBONE_APPLICATIONS)} "
            "or the path of a local Keras model file (.keras)"
        )
    if not resolve_path(backbone).is_file():
        raise ValueError(f"model.backbone = {backbone!r}: file not found ({resolve_path(backbone)})")
    return backbone


def _check_backbone_weights(weights: str) -> str:
    if weights in ("none", "imagenet") or is_mlflow_source(weights):
        return weights
    if not weights.endswith(".h5"):
        raise ValueError(
            f"model.backbone_weights = {weights!r}: expected none, imagenet, a local weights file (.weights.h5 or "
            "Keras' .h5), an MLflow model URI (runs:/<run id>/model, models:/<name>@<alias>) or a run id"
        )
    if not resolve_path(weights).is_file():
        raise ValueError(f"model.backbone_weights = {weights!r}: file not found ({resolve_path(weights)})")
    return weights


class ModelParams(_Section):
    # none: the CNN below; a Keras application; or a local .keras model (raw RGB 0..255 in, features out).
    backbone: Annotated[str, AfterValidator(_check_backbone)] = "none"
    # none (random init; a .keras backbone keeps its saved weights), imagenet, a local .h5 weights file, or an
    # MLflow model of one of our runs whose backbone part is taken (runs:/<id>/model, models:/<name>@champion).
    backbone_weights: Annotated[str, AfterValidator(_check_backbone_weights)] = "none"
    backbone_alpha: Annotated[float, Field(ge=0.35, le=1.4)] = 1.0  # mobilenet_v2 width multiplier
    # Images are resized to this inside the model before the backbone; None: as prepared (data.image_size),
    # or the fixed input size of a .keras backbone.
    backbone_input_size: Annotated[int, Field(ge=MIN_BACKBONE_IMAGE_SIZE, le=1024)] | None = None
    conv_filters: Annotated[list[PositiveInt], Field(min_length=1, max_length=8)] = [16, 32, 64]
    kernel_size: Annotated[int, Field(ge=1, le=11)] = 3
    # One value for every block, or one per block.
    batch_norm: bool | list[bool] = True
    # 0.9 rather than Keras' 0.99: with a few dozen steps per epoch the moving statistics must settle fast,
    # or validation runs on stale statistics and looks like chance.
    batch_norm_momentum: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    dropout: Rate | list[Rate] = 0.1
    dense_units: PositiveInt = 64
    head_dropout: Rate = 0.3
    l2: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # L2 penalty on every conv and dense kernel
    initializer: Initializer = "glorot_uniform"
    init_stddev: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0  # random_normal only
    augmentation: AugmentationParams = AugmentationParams()

    @model_validator(mode="after")
    def _per_block_lists_match(self) -> "ModelParams":
        for key in ("batch_norm", "dropout"):
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != len(self.conv_filters):
                raise ValueError(
                    f"model.{key} = {value}: a list needs one entry per conv block "
                    f"({len(self.conv_filters)}, as model.conv_filters), or give a single value"
                )
        return self

    @model_validator(mode="after")
    def _weights_fit_the_backbone(self) -> "ModelParams":
        if self.backbone == "none" and self.backbone_weights != "none" and not is_mlflow_source(self.backbone_weights):
            raise ValueError(
                f"model.backbone_weights = {self.backbone_weights!r} needs a Keras application as model.backbone "
                f"({', '.join(BACKBONE_APPLICATIONS)}); the CNN (backbone none) takes only none or an MLflow source"
            )
        if self.backbone.endswith(".keras") and (self.backbone_weights == "imagenet" or is_mlflow_source(self.backbone_weights)):
            raise ValueError(
                f"model.backbone_weights = {self.backbone_weights!r}: a .keras backbone brings its own weights "
                "(use none, or a .weights.h5 file for that model)"
            )
        return self

    @property
    def is_transfer(self) -> bool:
        """Two-phase transfer training (a backbone with a new head) rather than the CNN trained from scratch."""
        return self.backbone != "none" or self.backbone_weights != "none"

    def block_batch_norm(self, block: int) -> bool:
        return self.batch_norm[block] if isinstance(self.batch_norm, list) else self.batch_norm

    def block_dropout(self, block: int) -> float:
        return self.dropout[block] if isinstance(self.dropout, list) else self.dropout


class EarlyStoppingParams(_Section):
    enabled: bool = True
    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: Annotated[int, Field(ge=0)] = 4
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0
    restore_best_weights: bool = True


class ScheduleParams(_Section):
    """Shape of `train.lr_schedule`; each schedule reads only its own keys."""

    step_epochs: PositiveInt = 5  # step: multiply by step_factor every step_epochs
    step_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    decay_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1  # exponential: fraction left after the planned epochs
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 1.0  # cosine: linear warm-up from 0
    min_lr_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01  # cosine: floor, as a fraction of learning_rate
    plateau_factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5  # plateau: on a stalled val_loss
    plateau_patience: Annotated[int, Field(ge=0)] = 2


class GradientParams(_Section):
    clip: Literal["none", "norm", "value"] = "none"
    clip_value: Annotated[float, Field(gt=0.0)] = 1.0
    # The global norm of the gradients the optimizer applied (after clipping; mean per epoch) is flagged
    # outside these bounds.
    vanishing_below: Annotated[float, Field(ge=0.0)] = 1e-6
    exploding_above: Annotated[float, Field(gt=0.0)] = 1e3


class TrainParams(_Section):
    epochs: Annotated[int, Field(ge=1, le=1000)] = 15
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    learning_rate: Annotated[float, Field(gt=0.0, le=1e6)] = 0.002
    momentum: Rate = 0.9  # sgd, rmsprop
    nesterov: bool = False  # sgd
    beta_1: Rate = 0.9  # adam, adamw
    beta_2: Rate = 0.999  # adam, adamw
    epsilon: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-7
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.004  # adamw (decoupled)
    rho: Rate = 0.9  # rmsprop
    lr_schedule: Literal["constant", "step", "exponential", "cosine", "plateau"] = "cosine"
    schedule: ScheduleParams = ScheduleParams()
    gradients: GradientParams = GradientParams()
    early_stopping: EarlyStoppingParams = EarlyStoppingParams()
    class_weight: Literal["none", "balanced"] = "none"
    # Training stops as diverged (run FAILED, no model) when the loss exceeds this many times its initial value.
    divergence_factor: Annotated[float, Field(gt=1.0)] = 1000.0
    # Back up every epoch; a killed training started again continues from the last finished epoch.
    resume: bool = True
    # Train on this many images per class of the training split (drawn with train.seed); None: all of it.
    # The lessons study's small-data arms (overfitting, transfer) use it; validation and test stay whole.
    subset_per_class: PositiveInt | None = None
    seed: Seed = 42
    # Deterministic kernels (tf.config.experimental.enable_op_determinism): the same params and data give the
    # same metrics. Costs nothing measurable on CPU (bench/throughput.py); false only for a speed experiment.
    deterministic: bool = True
    # XLA-compile the training step (Keras `jit_compile`). Keras compiles with XLA only without op determinism;
    # on CPU it trained 8-9x slower (CPU time per step, bench/throughput.py): for accelerators.
    jit_compile: bool = False

    @model_validator(mode="after")
    def _xla_needs_nondeterministic_kernels(self) -> "TrainParams":
        if self.jit_compile and self.deterministic:
            # Keras would silently train without XLA: say so instead of ignoring the knob.
            raise ValueError("train.jit_compile = true needs train.deterministic = false "
                             "(Keras does not XLA-compile with op determinism on); allowed: jit_compile false, or both changed")
        return self


class EvaluateParams(_Section):
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 128
    top_k: Annotated[int, Field(ge=1)] = 2
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 15
    gallery_size: Annotated[int, Field(ge=0, le=100)] = 12  # most confidently wrong test images shown
    # Unfamiliar poses and poor focus: accuracy of the test split rotated / blurred by each strength.
    rotation_angles: Annotated[list[Annotated[float, Field(ge=-360, le=360)]], Field(min_length=1)] = [0, 15, 30, 60, 90]
    blur_sigmas: Annotated[list[Annotated[float, Field(ge=0, le=50)]], Field(min_length=1)] = [0, 1, 2, 3]
    sharpness_threshold: Annotated[float, Field(ge=0)] | None = None  # None: the test split's median blur score
    saliency_per_class: Annotated[int, Field(ge=0, le=20)] = 2
    shift_auc_threshold: Annotated[float, Field(gt=0.5, le=1.0)] = 0.6
    learning_curve: bool = False  # retrains on fractions of the training split: costs a training per fraction
    learning_curve_fractions: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = [0.1, 0.25, 0.5, 1.0]
    seed: Seed = 0


class RegistryParams(_Section):
    """The registry gate: register the model and move the `champion` alias only if it passes `minimum` and
    beats the current champion on the same test split (higher `metric` is better)."""

    enabled: bool = True
    model_name: str = "cassava-classifier"
    metric: str = "test_macro_f1"
    minimum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3


class TrackingParams(_Section):
    # None: one experiment per data source ("cassava-synthetic", "cassava-csv", ...).
    experiment_name: str | None = None
    # None: a name that says what differs (model, optimizer, learning rate, data version).
    run_name: str | None = None


def _check_layer_count(value: int | str) -> int | str:
    if value != "all" and not (isinstance(value, int) and value >= 0):
        raise ValueError(f"transfer.fine_tune_layers = {value!r}: expected a number of layers (>= 0) or all")
    return value


class TransferParams(_Section):
    """Two-phase training of a backbone with a new head (model.backbone / model.backbone_weights set).

    Phase 1 trains only the head on the frozen backbone; phase 2 unfreezes the backbone's top
    `fine_tune_layers` layers (batch-norm layers stay frozen) at a lower learning rate. Each phase has its own
    early stopping (train.early_stopping) and learning-rate schedule (train.lr_schedule)."""

    head_epochs: Annotated[int, Field(ge=0, le=1000)] | None = None  # phase 1; None: train.epochs
    # Phase 1 on backbone features computed once per data version (milliseconds per epoch; no augmentation
    # in phase 1 then). false: phase 1 runs the whole model, with augmentation.
    cache_features: bool = True
    fine_tune_layers: Annotated[int | str, AfterValidator(_check_layer_count)] = 20  # phase 2; 0: no phase 2
    fine_tune_epochs: Annotated[int, Field(ge=0, le=1000)] = 5
    fine_tune_learning_rate: Annotated[float, Field(gt=0.0, le=1e6)] | None = None  # None: learning_rate x factor
    fine_tune_lr_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1


class PretrainParams(_Section):
    """Source-task pretraining (tasks/pretrain.py): `overrides` on top of these params make the source run,
    trained in its own workspace folder and logged in this project's tracking store."""

    overrides: list[str] = [
        "data.seed=2024", "data.synthetic.images_per_class=300", "tracking.experiment_name=cassava-pretrain",
    ]


class RetrainScheduleParams(_Section):
    """When `python -m flows.local_platform` retrains: a cron expression or a fixed interval (not both; neither serves
    the deployment without a schedule), in a timezone, each run with these overrides on top of params.yaml."""

    cron: str | None = "0 3 * * *"  # minute hour day-of-month month day-of-week
    interval_seconds: Annotated[float, Field(gt=0)] | None = None
    timezone: str = "UTC"  # an IANA name, e.g. Europe/Paris: cron times are local to it
    overrides: list[str] = []  # section.key=value, as -S takes them

    @model_validator(mode="after")
    def _check(self) -> "RetrainScheduleParams":
        from datetime import datetime
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from cronsim import CronSim, CronSimError

        if self.cron is not None and self.interval_seconds is not None:
            raise ValueError("schedule.cron and schedule.interval_seconds are both set: keep one, set the other to null")
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.now())
            except CronSimError as error:
                raise ValueError(f"schedule.cron = {self.cron!r}: not a cron expression ({error}); "
                                 "expected 'minute hour day-of-month month day-of-week', e.g. '0 3 * * *'") from None
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"schedule.timezone = {self.timezone!r}: not a known time zone "
                             "(an IANA name such as 'UTC' or 'Europe/Paris')") from None
        for override in self.overrides:
            if override.strip().startswith("schedule."):
                raise ValueError(f"schedule.overrides: {override!r} changes the schedule itself; set it directly")
        return self


def _check_seeds(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"study.seeds = {seeds}: each seed once (a repeated seed adds no information)")
    return seeds


class StudyParams(_Section):
    """The lessons study (`python -m flows.lessons_study`, tasks/lessons.py): every arm's training budget, the
    seeds, and the verdict rule's settings. The model is model.conv_filters / dense_units; the study switches
    the extras (batch norm, dropout, schedules, early stopping, augmentation) off except where a lesson tests one."""

    seeds: Annotated[list[Seed], Field(min_length=1, max_length=20), AfterValidator(_check_seeds)] = [0, 1, 2]
    epochs: Annotated[int, Field(ge=1, le=1000)] = 12  # every arm (transfer: head + fine-tuning epochs)
    train_per_class: PositiveInt | None = None  # lessons 1-3 and 6: images per class trained on; None: all
    small_per_class: PositiveInt = 20  # lessons 4 (overfitting) and 5 (transfer at limited data)
    modest_learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.002  # Adam, lessons 1-4 and 6
    high_learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.02  # lesson 3
    sgd_learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.02  # lesson 2, with and without momentum
    target_accuracy: Fraction = 0.3  # "epochs to target" counts epochs until validation accuracy reaches it
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95  # of the t-interval over seeds
    margin: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.02  # effects within +-margin are no effect (a clean tie)
    workers: PositiveInt | None = None  # arms trained at once (default: one per core)


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    transfer: TransferParams = TransferParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    tracking: TrackingParams = TrackingParams()
    pretrain: PretrainParams = PretrainParams()
    schedule: RetrainScheduleParams = RetrainScheduleParams()
    study: StudyParams = StudyParams()

    @model_validator(mode="after")
    def _backbone_sees_enough_pixels(self) -> "Params":
        size = self.model.backbone_input_size or self.data.image_size
        if self.model.backbone in BACKBONE_APPLICATIONS and size < MIN_BACKBONE_IMAGE_SIZE:
            raise ValueError(
                f"model.backbone = {self.model.backbone} needs images of at least {MIN_BACKBONE_IMAGE_SIZE} pixels: "
                f"set data.image_size or model.backbone_input_size (now {size})"
            )
        return self

    @property
    def head_epochs(self) -> int:
        return self.train.epochs if self.transfer.head_epochs is None else self.transfer.head_epochs

    @property
    def fine_tune_learning_rate(self) -> float:
        return self.transfer.fine_tune_learning_rate or self.train.learning_rate * self.transfer.fine_tune_lr_factor

    @model_validator(mode="after")
    def _scheduled_overrides_valid(self) -> "Params":
        """A scheduled run's overrides are checked now, not at 3 a.m. when the run starts."""
        if self.schedule.overrides:
            tree = self.model_dump()
            tree["schedule"]["overrides"] = []
            try:
                validate_params(apply_overrides(tree, self.schedule.overrides))
            except ParamsError as error:
                raise ValueError(f"schedule.overrides: {str(error).removeprefix('invalid params: ')}") from None
        return self

    @model_validator(mode="after")
    def _gate_metric_is_scored(self) -> "Params":
        allowed = gate_metrics(self.evaluate.top_k)
        metric = self.registry.metric
        if metric not in allowed and not PER_CLASS_GATE_METRIC.fullmatch(metric):
            raise ValueError(
                f"registry.metric = {metric!r}: not a metric the evaluation scores; use one of "
                f"{', '.join(allowed)} or test_precision/test_recall/test_f1.<class>"
            )
        return self


# The registry gate compares a metric where higher is better, among those `evaluate.score_predictions` returns.
PER_CLASS_GATE_METRIC = re.compile(r"test_(precision|recall|f1)\.[^.\s]+")


def gate_metrics(top_k: int) -> tuple[str, ...]:
    return ("test_accuracy", "test_macro_f1", f"test_top{top_k}_accuracy")


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and its YAML-typed value (as `dvc exp run -S` does)."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ParamsError(f"override {override!r}: value is not valid YAML ({error.problem})") from None
    return key.strip().split("."), value


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the params tree with every `section.key=value` override applied."""
    merged: dict[str, Any] = _deep_copy(tree)
    for override in overrides:
        key_path, value = parse_override(override)
        node = merged
        for part in key_path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else child
            if not isinstance(child, dict):
                raise ParamsError(f"override {override!r}: {part} is not a section")
            node = child
        node[key_path[-1]] = value
    return merged


def _deep_copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy(value) if isinstance(value, Mapping) else value for key, value in tree.items()}


def _describe_error(error: dict[str, Any], model: type[BaseModel]) -> str:
    # Union members appear in the location as type tags ("int", "dict[str,...]", "function-after[...]"), not keys.
    key = ".".join(str(part) for part in error["loc"]
                   if not (str(part) in ("int", "float") or str(part).startswith(("function-", "dict["))))
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, [str(part) for part in error["loc"][:-1]])
        return f"{key}: unknown key (allowed: {', '.join(allowed)})"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return f"{key} = {error.get('input')!r}: {error['msg'].lower()}"


def _allowed_keys(model: type[BaseModel], section_path: list[str]) -> list[str]:
    for part in section_path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def validate_params(tree: Mapping[str, Any]) -> Params:
    """Validate a params tree; raise ParamsError with one line per problem (key, bad value, allowed)."""
    try:
        return Params.model_validate(tree)
    except ValidationError as error:
        problems = [_describe_error(detail, Params) for detail in error.errors()]
        raise ParamsError("invalid params: " + "; ".join(problems)) from None


PROFILES_DIR = "profiles"


def profile_overrides(name: str) -> list[str]:
    """A params profile (`profiles/<name>.yaml`, a partial params tree) as `section.key=value` overrides, in the
    order -S takes them: so a profile works on every entry, and with `dvc exp run` as -S arguments."""
    file = code_root() / PROFILES_DIR / f"{name}.yaml"
    if not file.is_file():
        known = sorted(path.stem for path in (code_root() / PROFILES_DIR).glob("*.yaml"))
        raise ParamsError(f"profile {name!r}: no {file.relative_to(code_root())} (profiles: {', '.join(known) or 'none'})")
    overrides: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            overrides.append(f"{prefix}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix('...').strip()}")

    walk("", yaml.safe_load(file.read_text()) or {})
    return overrides


def load_params(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), profile: str | None = None
) -> Params:
    """Read params.yaml (default: the one at the repository root), apply a profile's then the given overrides,
    validate."""
    overrides = [*(profile_overrides(profile) if profile else []), *overrides]
    return validate_params(apply_overrides(read_params_tree(path), overrides))


def read_params_tree(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The params file as a tree, not yet validated (a sweep applies each point's overrides to it)."""
    params_file = Path(path) if path else workspace_root() / DEFAULT_PARAMS_FILE
    try:
        tree = yaml.safe_load(params_file.read_text())
    except FileNotFoundError:
        raise ParamsError(
            f"params file not found: {params_file}; run from the repository root or pass --params"
        ) from None
    except yaml.YAMLError as error:
        raise ParamsError(_describe_yaml_error(params_file, error)) from None
    if not tree:
        # Running on built-in defaults would hide a truncated or emptied file.
        raise ParamsError(f"{params_file} is empty: it must hold the sections {', '.join(Params.model_fields)} "
                          "(restore it with `git checkout params.yaml`)")
    if not isinstance(tree, dict):
        raise ParamsError(f"{params_file}: expected a mapping of sections ({', '.join(Params.model_fields)})")
    return tree


def _describe_yaml_error(params_file: Path, error: yaml.YAMLError) -> str:
    """`file:line:column: problem` (1-based, as editors count), instead of PyYAML's several-line message."""
    mark = getattr(error, "problem_mark", None)
    where = f"{params_file}:{mark.line + 1}:{mark.column + 1}" if mark else str(params_file)
    problem = getattr(error, "problem", None) or str(error)
    return f"{where}: not valid YAML: {problem}"


def flatten_params(params: Params) -> dict[str, str]:
    """Flatten for MLflow. Rule: nested keys joined with '.', lists written as compact YAML (`[16, 32, 64]`)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, list):
            flat[prefix] = yaml.safe_dump(value, default_flow_style=True).strip()
        else:
            flat[prefix] = str(value)

    walk("", params.model_dump())
    return flat


def code_root() -> Path:
    """The checkout holding this code (its git commit is what a run records)."""
    return Path(__file__).resolve().parent.parent


def workspace_root() -> Path:
    """Where params.yaml, data/, models/ and reports/ live: CASSAVA_WORKSPACE if set, else the checkout
    (inside a `dvc exp run --queue` copy: the copy)."""
    workspace = os.environ.get("CASSAVA_WORKSPACE")
    return Path(workspace).resolve() if workspace else code_root()


def tracking_root() -> Path:
    """Where the default tracking store lives: DVC_ROOT (the original repository, also from a queued
    experiment's temporary copy, so its runs are not lost with the copy), else the workspace."""
    dvc_root = os.environ.get("DVC_ROOT")
    return Path(dvc_root).resolve() if dvc_root else workspace_root()
