"""Typed model and experiment configs, every default in one place.

`load_config` reads both formats of the original trainer (method.md): the flat form
(`velocity_net`, `saliency_net`, `saliency_*` keys) and the nested form (`codec`,
`saliency`, `velocity` sections). Both resolve to the same `ModelConfig`.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rfp_core.paths import resolve_against_root

Augmentation = Literal["color_jitter", "grayscale", "hflip", "random_erasing", "gaussian_blur"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
StructureEncoder = Literal["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "thumbnail"]


class ConfigError(ValueError):
    """A config or experiment file that cannot be used; the message names file, key and fix."""


class _Strict(BaseModel):
    # Unknown keys are errors, not silently ignored: a misspelt key must not fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class UNetConfig(_Strict):
    type: Literal["UNet"] = "UNet"
    model_channels: int = Field(128, ge=8)
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 8], min_length=1)
    normalization: Literal["GroupNorm32"] = "GroupNorm32"
    activation: Literal["SiLU"] = "SiLU"
    num_res_blocks: int = Field(2, ge=1)
    # zero-initialise the last conv of every res block (residual starts as identity)
    zero_res_blocks: bool = False
    # zero-initialise the output conv: unconstrained coordinates then stay put (method.md)
    zero_out: bool = True
    # downsample factors (1 = full resolution, 2 = half, ...) at which blocks get self-attention
    attention_resolutions: list[int] = Field(default_factory=list)
    num_attention_heads: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class SaliencyNetConfig(_Strict):
    type: Literal["ResNetSaliencyNet"] = "ResNetSaliencyNet"
    backbone: Backbone = "resnet50"
    num_classes: Literal[2] = 2
    pretrained: bool = True
    # explicit weights file; when unset, torchvision's cache under $TORCH_HOME is searched
    pretrained_path: Path | None = None
    latent_channels: int = Field(512, ge=1)


class SaliencyConfig(_Strict):
    net: SaliencyNetConfig = Field(default_factory=SaliencyNetConfig)
    learning_rate: float = Field(5e-5, gt=0)
    accuracy_threshold: float = Field(0.995, gt=0, le=1)
    warmup_threshold: float = Field(0.90, gt=0, le=1)
    blend_fraction: float = Field(0.0, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augmentations: list[Augmentation] = Field(
        default_factory=lambda: ["color_jitter", "grayscale", "hflip", "random_erasing"]
    )
    batch_size: int = Field(32, ge=2)
    # an unreachable threshold ends with a clear error after this many steps, never runs forever
    max_steps: int = Field(20_000, ge=1)
    eval_every: int = Field(50, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)


class CodecNetConfig(_Strict):
    type: Literal["Identity", "VAE"] = "Identity"
    latent_channels: int = Field(4, ge=1)
    model_channels: int = Field(64, ge=8)
    # number of stride-2 stages = len(ch_mult) - 1
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)


class CodecConfig(_Strict):
    net: CodecNetConfig = Field(default_factory=CodecNetConfig)
    learning_rate: float = Field(1e-4, gt=0)
    train_images: int = Field(200_000, ge=0)
    batch_size: int = Field(16, ge=1)
    kl_weight: float = Field(1e-6, ge=0)
    l1_weight: float = Field(1.0, ge=0)
    perceptual_weight: float = Field(0.1, ge=0)


class VelocityConfig(_Strict):
    net: UNetConfig = Field(default_factory=UNetConfig)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    train_images: int = Field(6_000_000, ge=1)
    train_batch_size: int = Field(48, ge=1)
    train_minibatch_size: int = Field(24, ge=1)
    timestep_sampling: Literal["uniform", "logit-normal"] = "logit-normal"
    # "saliency" = the saliency-weighted loss; "mse" = plain rectified flow (forced in generative mode)
    loss: Literal["saliency", "mse"] = "saliency"
    # With the saliency loss: weight of a plain MSE term added to it (an anchor). h's Jacobian is
    # low-rank and spread over the whole frame, so the saliency loss alone lets the background
    # drift (method.md's colour cast). Demo, 800 steps: mask IoU 0.56 without, 0.75 with 500.
    mse_weight: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    gradient_clip: float | None = Field(1.0, gt=0)
    ema: float = Field(0.999, ge=0, lt=1)
    bf16: bool = False
    num_inference_steps: int = Field(12, ge=1)
    sampler: Literal["euler", "heun", "rk4"] = "euler"
    sample_batch_size: int = Field(8, ge=1)
    sample_every_images: int = Field(100_000, ge=1)
    checkpoint_every_minutes: float = Field(10.0, gt=0)
    # also checkpoint every N optimizer steps (None = by time only); tests and short runs use it
    checkpoint_every_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _minibatch_divides_batch(self) -> "VelocityConfig":
        if self.train_batch_size % self.train_minibatch_size:
            raise ValueError(
                f"train_batch_size ({self.train_batch_size}) must be a multiple of "
                f"train_minibatch_size ({self.train_minibatch_size}): the batch is reached by "
                "gradient accumulation over minibatches"
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.train_batch_size // self.train_minibatch_size

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the `train_images` budget (at least one)."""
        return max(1, self.train_images // self.train_batch_size)


class StructureConfig(_Strict):
    pairing: bool = False
    candidates: int = Field(8, ge=1)
    encoder: StructureEncoder = "dinov2_vits14"
    # explicit weights file for the DINOv2 encoder; else the timm / HF cache is searched
    weights_path: Path | None = None
    thumbnail_size: int = Field(16, ge=4)


class ModelConfig(_Strict):
    type: Literal["RFPix2pixModel"] = "RFPix2pixModel"
    max_size: int = Field(128, ge=8)
    # the trainer's later layout may name the domains in the config; the CLI flags win
    domain0: list[str] | Literal["random"] | None = None
    domain1: list[str] | None = None
    seed: int = 0
    # frames kept in the store are capped to this short side; crops are taken from them
    store_max_side: int = Field(512, ge=16)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    saliency: SaliencyConfig = Field(default_factory=SaliencyConfig)
    velocity: VelocityConfig = Field(default_factory=VelocityConfig)
    structure: StructureConfig = Field(default_factory=StructureConfig)

    @field_validator("domain0", mode="before")
    @classmethod
    def _domain0_random(cls, value: Any) -> Any:
        if isinstance(value, list) and value == ["random"]:
            return "random"
        return value

    @property
    def generative(self) -> bool:
        return self.domain0 == "random"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def flat_params(self) -> dict[str, str]:
        """Dotted-key view for trackers (MLflow params)."""
        return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in _flatten(self.model_dump(mode="json")).items()}


class ExperimentConfig(_Strict):
    """One file in `experiments/`: which folders, which model config, what to override."""

    name: str
    domain0: list[Path] | Literal["random"]
    domain1: list[Path] = Field(min_length=1)
    config: Path
    overrides: dict[str, Any] = Field(default_factory=dict)
    # optional folder of true shape masks for domain0 frames (same file stems), used by the evaluation
    masks: Path | None = None

    @field_validator("domain0", mode="before")
    @classmethod
    def _domain0_random(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "random":
            return [value]
        if isinstance(value, list) and value == ["random"]:
            return "random"
        return value

    @field_validator("domain1", mode="before")
    @classmethod
    def _domain1_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def generative(self) -> bool:
        return self.domain0 == "random"

    def model_config_resolved(self) -> ModelConfig:
        return load_config(self.config, overrides=self.overrides)


# ----------------------------------------------------------------------------------------
# The flat (original) format

_FLAT_TOP = {"type", "max_size", "domain0", "domain1", "seed", "store_max_side"}
_FLAT_VELOCITY = {
    "train_batch_size", "train_minibatch_size", "train_images", "learning_rate", "weight_decay",
    "num_inference_steps", "timestep_sampling", "sample_batch_size", "lr_schedule",
    "warmup_fraction", "gradient_clip", "ema", "bf16", "sampler", "sample_every_images",
    "checkpoint_every_minutes", "checkpoint_every_steps", "loss",
}
_FLAT_RENAMES = {
    "velocity_net": ("velocity", "net"),
    "saliency_net": ("saliency", "net"),
    "codec_net": ("codec", "net"),
    "structure_pairing": ("structure", "pairing"),
    "structure_candidates": ("structure", "candidates"),
    "structure_encoder": ("structure", "encoder"),
}
_SECTIONS = {"codec", "saliency", "velocity", "structure"}


def _is_flat(raw: dict[str, Any]) -> bool:
    if _SECTIONS & raw.keys():
        return False
    return any(
        k in _FLAT_RENAMES or k in _FLAT_VELOCITY or k.startswith(("saliency_", "codec_")) for k in raw
    )


def _flat_to_nested(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple, str]]:
    """Return the nested dict and a map from nested location back to the user's flat key."""
    nested: dict[str, Any] = {}
    origin: dict[tuple, str] = {}
    for key, value in raw.items():
        if key in _FLAT_RENAMES:
            loc = _FLAT_RENAMES[key]
        elif key in _FLAT_VELOCITY:
            loc = ("velocity", key)
        elif key.startswith("saliency_"):
            loc = ("saliency", key.removeprefix("saliency_"))
        elif key.startswith("codec_"):
            loc = ("codec", key.removeprefix("codec_"))
        else:
            loc = (key,)  # top-level or unknown: validation names it
        node = nested
        for part in loc[:-1]:
            node = node.setdefault(part, {})
        node[loc[-1]] = value
        origin[loc] = key
    return nested, origin


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _describe(err: dict[str, Any], origin: dict[tuple, str], model: type[BaseModel]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    # name the key the way the user wrote it (flat files keep their flat names)
    shown = None
    for n in range(len(loc), 0, -1):
        if loc[:n] in origin:
            shown = ".".join([origin[loc[:n]], *loc[n:]])
            break
    shown = shown or ".".join(loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key '{shown}'{suggestion}; known keys here: {', '.join(sorted(known))}"
    got = err.get("input")
    return f"'{shown}': {err['msg'].lower()} (got {json.dumps(got, default=str)[:80]})"


def _known_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _validate(model: type[BaseModel], data: dict[str, Any], origin: dict[tuple, str], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "\n  - ".join(_describe(e, origin, model) for e in exc.errors())
        raise ConfigError(f"{source}: invalid config\n  - {problems}") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} must be a JSON object, got {type(raw).__name__}")
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<config>", overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Validate a config dict in either format; `overrides` (nested or flat) are merged on top."""
    if _is_flat(raw):
        nested, origin = _flat_to_nested(raw)
    else:
        nested, origin = copy.deepcopy(raw), {}
    if overrides:
        extra = _flat_to_nested(overrides)[0] if _is_flat(overrides) else overrides
        nested = deep_merge(nested, extra)
    return _validate(ModelConfig, nested, origin, source)


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ModelConfig:
    path = Path(path)
    return config_from_dict(_read_json(path, "config"), source=str(path), overrides=overrides)


def load_experiment(path: str | os.PathLike, root: Path | None = None) -> ExperimentConfig:
    """Read `experiments/<name>.json`; relative folders and config paths resolve against `root`."""
    path = Path(path)
    raw = _read_json(path, "experiment")
    raw.setdefault("name", path.stem)
    exp = _validate(ExperimentConfig, raw, {}, str(path))
    resolve = lambda p: resolve_against_root(p, root)  # noqa: E731
    if exp.domain0 != "random":
        exp.domain0 = [resolve(p) for p in exp.domain0]
    exp.domain1 = [resolve(p) for p in exp.domain1]
    exp.config = resolve(exp.config)
    if exp.masks is not None:
        exp.masks = resolve(exp.masks)
    if not exp.config.exists():
        raise ConfigError(f"{path}: 'config' names {exp.config}, which does not exist")
    return exp
