"""Typed model and experiment configs, every default in one place.

`load_config` reads both formats of the original trainer (docs/METHOD.md): the flat form
(`velocity_net`, `saliency_net`, `saliency_*` keys) and the nested form (`codec`,
`saliency`, `velocity` sections). Both resolve to the same `ModelConfig`.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from rfp_core.paths import resolve_against_root

Augmentation = Literal["color_jitter", "grayscale", "hflip", "random_erasing", "gaussian_blur"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
StructureEncoder = Literal["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "thumbnail"]
Normalization = Literal["GroupNorm32", "GroupNorm16", "GroupNormAuto", "BatchNorm2d", "InstanceNorm2d", "None"]
Activation = Literal["SiLU", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "None", "Softmax"]
Downsample = Literal["AvgPool", "StridedConv"]
Upsample = Literal["Bilinear", "NearestConv"]


class ConfigError(ValueError):
    """A config or experiment file that cannot be used; the message names file, key and fix."""


class _Strict(BaseModel):
    # Unknown keys are errors, not silently ignored: a misspelt key must not fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Every default below is the original trainer's constructor default, so a file written for it
# means here what it meant there. This project's own configs set what they want explicitly.


class UNetConfig(_Strict):
    type: Literal["UNet"] = "UNet"
    model_channels: int = Field(64, ge=1)
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    normalization: Normalization = "GroupNorm32"
    activation: Activation = "SiLU"
    num_res_blocks: int = Field(2, ge=1)
    # zero-initialise the last conv of every res block (the residual starts as the identity)
    zero_res_blocks: bool = False
    # LEVEL indices into ch_mult (0 = full resolution) whose blocks get self-attention
    attention_resolutions: list[int] = Field(default_factory=list)
    num_attention_heads: int = Field(8, ge=1)
    output_activation: Activation = "None"
    downsample: Downsample = "AvgPool"
    upsample: Upsample = "Bilinear"
    mid_attention: bool = False
    # this project's option: zero-initialise the output conv, so v = 0 at init (docs/METHOD.md)
    zero_out: bool = False

    @model_validator(mode="after")
    def _levels_exist(self) -> "UNetConfig":
        bad = [i for i in self.attention_resolutions if not 0 <= i < len(self.ch_mult)]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad}: these are level indices into ch_mult (0 .. {len(self.ch_mult) - 1}), "
                "as in the original trainer, not downsample factors"
            )
        return self


class DiTConfig(_Strict):
    type: Literal["DiT"] = "DiT"
    patch_size: int = Field(2, ge=1)
    hidden_size: int = Field(384, ge=4)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(6, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)


VelocityNetConfig = Annotated[Union[UNetConfig, DiTConfig], Field(discriminator="type")]


class SaliencyNetConfig(_Strict):
    type: Literal["ResNetSaliencyNet"] = "ResNetSaliencyNet"
    backbone: Backbone = "resnet18"
    num_classes: Literal[2] = 2
    pretrained: bool = True
    # explicit weights file; when unset, torchvision's cache under $TORCH_HOME is searched
    pretrained_path: Path | None = None
    latent_channels: int = Field(512, ge=1)


class SaliencyConfig(_Strict):
    type: Literal["Saliency"] = "Saliency"
    net: SaliencyNetConfig = Field(default_factory=SaliencyNetConfig)
    learning_rate: float = Field(1e-4, gt=0)
    accuracy_threshold: float = Field(0.995, gt=0, le=1)
    warmup_threshold: float = Field(0.90, gt=0, le=1)
    blend_fraction: float = Field(0.0, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augmentations: list[Augmentation] = Field(default_factory=list)
    # this project's additions (the original has no such keys)
    batch_size: int = Field(32, ge=2)
    # an unreachable threshold ends with a clear error after this many steps, never runs forever
    max_steps: int = Field(20_000, ge=1)
    eval_every: int = Field(50, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    # also checkpoint every N steps (None = every 5 minutes and at the 1a -> 1b switch only)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    # which accuracy the thresholds are compared with: "train_smoothed" = the original's (training
    # batches, mean of the last `smoothing_window`, window full); "holdout" = held-out frames (one
    # half of the held-out sources; the other half reports). Both are logged (train/saliency_stop.py).
    stop_on: Literal["train_smoothed", "holdout"] = "train_smoothed"
    smoothing_window: int = Field(100, ge=1)


class IdentityNetConfig(_Strict):
    # "IdentityNet" is the name in the trainer's earlier files
    type: Literal["Identity", "IdentityNet"] = "Identity"

    @field_validator("type", mode="after")
    @classmethod
    def _one_name(cls, value: str) -> str:
        return "Identity"


class _ConvCodecConfig(_Strict):
    """What every convolutional codec net has: its latent, widths, levels and blocks."""

    latent_channels: int = Field(16, ge=1)
    model_channels: int = Field(64, ge=1)
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    normalization: Normalization = "GroupNorm32"
    activation: Activation = "SiLU"
    num_res_blocks: int = Field(2, ge=1)


class AutoEncoderConfig(_ConvCodecConfig):
    type: Literal["AutoEncoder", "VAE", "SAE"] = "VAE"
    decoder_num_res_blocks: int | None = Field(None, ge=1)
    attention_resolutions: list[int] = Field(default_factory=list)
    mid_attention: bool = False
    num_attention_heads: int = Field(8, ge=1)
    downsample: Downsample = "AvgPool"
    upsample: Upsample = "Bilinear"
    output_activation: Activation = "Tanh"
    # SAE only: the sphere's epsilon and the largest training noise angle
    eps: float = Field(1e-8, gt=0)
    noise_angle_degrees_max: float = Field(85.0, gt=0, lt=90)


class ConvEncoderDecoderConfig(_ConvCodecConfig):
    """The trainer's earlier codec net: its files load, training it is not supported yet."""

    type: Literal["ConvEncoderDecoder"] = "ConvEncoderDecoder"


def _codec_net_kind(value: Any) -> str:
    kind = value.get("type", "Identity") if isinstance(value, dict) else getattr(value, "type", "Identity")
    return {"IdentityNet": "Identity", "VAE": "AutoEncoder", "SAE": "AutoEncoder"}.get(kind, kind)


CodecNetConfig = Annotated[
    Union[
        Annotated[IdentityNetConfig, Tag("Identity")],
        Annotated[AutoEncoderConfig, Tag("AutoEncoder")],
        Annotated[ConvEncoderDecoderConfig, Tag("ConvEncoderDecoder")],
    ],
    Discriminator(_codec_net_kind),
]


class CodecLossConfig(_Strict):
    """One entry of `codec.losses`, as the original lists them; logged under its `id`.

    `StructureLoss` is this project's: multi-scale gradient L1 + (1 - SSIM)/2, a perceptual-like
    term that needs no downloaded weights (LPIPS needs VGG16's)."""

    type: Literal[
        "L1Loss",
        "MSELoss",
        "KLLoss",
        "LPIPSLoss",
        "SAEPixelConsistencyLoss",
        "SAELatentConsistencyLoss",
        "StructureLoss",
    ]
    id: str | None = None
    weight: float | None = None
    backbone: Literal["vgg16"] = "vgg16"
    recon_weight: float = 1.0
    lpips_weight: float = 1.0

    @model_validator(mode="after")
    def _defaults(self) -> "CodecLossConfig":
        ids = {
            "L1Loss": "l1_loss",
            "MSELoss": "mse_loss",
            "KLLoss": "kl_loss",
            "LPIPSLoss": "lpips_loss",
            "SAEPixelConsistencyLoss": "pix_con_loss",
            "SAELatentConsistencyLoss": "lat_con_loss",
            "StructureLoss": "structure_loss",
        }
        if self.id is None:
            self.id = ids[self.type]
        if self.weight is None:
            self.weight = 1e-6 if self.type == "KLLoss" else 1.0
        return self


class CodecConfig(_Strict):
    type: Literal["Codec"] = "Codec"
    net: CodecNetConfig = Field(default_factory=IdentityNetConfig)
    losses: list[CodecLossConfig] = Field(default_factory=list)
    learning_rate: float = Field(1e-4, gt=0)
    train_images: int = Field(0, ge=0)
    train_batch_size: int = Field(64, ge=1)
    # None = train_batch_size (no accumulation), as in the original
    train_minibatch_size: int | None = Field(None, ge=1)
    sample_batch_size: int = Field(8, ge=1)
    augmentations: list[Augmentation] = Field(default_factory=list)
    gradient_clip: float = Field(1.0, ge=0)
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    # this project's addition: checkpoint the codec phase every N minutes so a kill loses little
    checkpoint_every_minutes: float = Field(10.0, gt=0)
    # also checkpoint every N optimizer steps (None = by time only)
    checkpoint_every_steps: int | None = Field(None, ge=1)

    @property
    def minibatch(self) -> int:
        return self.train_minibatch_size or self.train_batch_size

    @property
    def accumulation_steps(self) -> int:
        return max(1, self.train_batch_size // self.minibatch)

    @property
    def total_steps(self) -> int:
        return self.train_images // self.train_batch_size


class VelocityConfig(_Strict):
    type: Literal["Velocity"] = "Velocity"
    net: VelocityNetConfig = Field(default_factory=UNetConfig)
    learning_rate: float = Field(2e-4, gt=0)
    train_images: int = Field(6_000_000, ge=1)
    train_batch_size: int = Field(48, ge=1)
    train_minibatch_size: int = Field(48, ge=1)
    timestep_sampling: Literal["uniform", "logit-normal"] = "logit-normal"
    num_inference_steps: int = Field(12, ge=1)
    sample_batch_size: int = Field(8, ge=1)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    # 0 = off, as in the original
    gradient_clip: float = Field(0.0, ge=0)
    # 0 = off (the raw weights are sampled and saved), as in the original
    ema: float = Field(0.0, ge=0, lt=1)
    bf16: bool = False
    # this project's: steps over which the EMA's horizon 1/(1-d) ramps from 1 to 1/(1-ema); None =
    # ema/(1-ema), the running mean until then (train/ema.py); 0 = the original's constant decay
    ema_warmup_steps: int | None = Field(None, ge=0)
    # this project's additions
    weight_decay: float = Field(1e-4, ge=0)
    # "saliency" = the saliency-weighted loss; "mse" = plain rectified flow (forced in generative mode)
    loss: Literal["saliency", "mse"] = "saliency"
    # With the saliency loss: weight of a plain MSE term added to it (an anchor). h's Jacobian is
    # low-rank and spread over the whole frame, so the saliency loss alone lets what it does not see
    # drift (docs/METHOD.md, the colour cast); the anchor holds those coordinates to the straight line.
    mse_weight: float = Field(0.0, ge=0)
    # "absolute": loss = saliency + mse_weight x MSE. "relative": mse_weight is the anchor's size as a
    # share of the saliency term's (weight x running mean of the saliency term / running mean of the
    # MSE), so one value means the same at any image size or latent width (train/anchor.py)
    mse_weight_mode: Literal["absolute", "relative"] = "absolute"
    # how (X0, X1) are paired in a minibatch: "independent" as drawn, or "minibatch_ot" (an exact
    # assignment minimising the batch's pair cost in `coupling_space`: the flow's own space
    # ("pixel") or the structure encoder's embeddings ("structure"); train/coupling.py)
    coupling: Literal["independent", "minibatch_ot"] = "independent"
    coupling_space: Literal["pixel", "structure"] = "pixel"
    sampler: Literal["euler", "heun", "rk4"] = "euler"
    sample_every_images: int = Field(100_000, ge=1)
    checkpoint_every_minutes: float = Field(10.0, gt=0)
    # also checkpoint every N optimizer steps (None = by time only); tests and short runs use it
    checkpoint_every_steps: int | None = Field(None, ge=1)
    # speed switches (train/speed.py), each measured on/off by `rfp bench train --switches`
    # (docs/BENCHMARKS.md). Defaults keep the numbers of a run unchanged.
    # the velocity net's weights (hence its activations) in channels-last memory layout
    channels_last: bool = False
    # AdamW's implementation: "default" is torch's choice (a per-parameter loop on CPU, foreach on CUDA)
    adamw: Literal["default", "foreach", "fused"] = "default"
    # torch.compile the velocity net (compiles at the first step; different rounding)
    compile: bool = False
    # intra-op threads for training on CPU (None = torch's default, one per core)
    cpu_threads: int | None = Field(None, ge=1)

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
        return {
            k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in _flatten(self.model_dump(mode="json")).items()
        }


class ExperimentConfig(_Strict):
    """One file in `experiments/`: which folders, which model config, what to override."""

    name: str
    domain0: list[Path] | Literal["random"]
    domain1: list[Path] = Field(min_length=1)
    config: Path
    overrides: dict[str, Any] = Field(default_factory=dict)
    # optional folder of true shape masks for domain0 frames (same file stems), used by the evaluation
    masks: Path | None = None
    # opt-in straightening after the velocity: {"rounds": 1, "pairs": N, "distill": true}
    # (rfp_pipeline/assets/reflow.py)
    reflow: dict[str, Any] | None = None
    # media (files or folders of videos and stills) the evaluated model translates (asset translated_media)
    translate: list[Path] = Field(default_factory=list)

    @field_validator("domain0", mode="before")
    @classmethod
    def _domain0_random(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "random":
            return [value]
        if isinstance(value, list) and value == ["random"]:
            return "random"
        return value

    @field_validator("domain1", "translate", mode="before")
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
    "train_batch_size",
    "train_minibatch_size",
    "train_images",
    "learning_rate",
    "weight_decay",
    "num_inference_steps",
    "timestep_sampling",
    "sample_batch_size",
    "lr_schedule",
    "warmup_fraction",
    "gradient_clip",
    "ema",
    "bf16",
    "sampler",
    "sample_every_images",
    "checkpoint_every_minutes",
    "checkpoint_every_steps",
    "loss",
    "mse_weight",
    "ema_warmup_steps",
    "mse_weight_mode",
    "coupling",
    "coupling_space",
    "channels_last",
    "adamw",
    "compile",
    "cpu_threads",
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
    """The earlier layout: velocity keys at the top level (a `codec` section may sit beside them)."""
    if {"velocity", "saliency", "structure"} & raw.keys():
        return False
    return any(k in _FLAT_RENAMES or k in _FLAT_VELOCITY or k.startswith(("saliency_", "codec_")) for k in raw)


def _lift_structure(nested: dict[str, Any], source: str) -> dict[str, Any]:
    """The current trainer keeps `structure_pairing` / `structure_candidates` inside `velocity`:
    move them to the `structure` section, where every structure setting lives here."""
    velocity = nested.get("velocity")
    if not isinstance(velocity, dict):
        return nested
    for old, new in (("structure_pairing", "pairing"), ("structure_candidates", "candidates")):
        if old in velocity:
            value = velocity.pop(old)
            structure = nested.setdefault("structure", {})
            if new in structure and structure[new] != value:
                raise ConfigError(
                    f"{source}: velocity.{old} ({value}) contradicts structure.{new} ({structure[new]}); keep one"
                )
            structure[new] = value
    return nested


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
    """`override` on top of `base`, dict by dict; a section whose `type` changes (a DiT net over
    a UNet one) is replaced whole, since the old type's keys mean nothing to the new one."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        retyped = (
            isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) != old.get("type")
        )
        if isinstance(value, dict) and isinstance(old, dict) and not retyped:
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


_UNION_TAGS = {
    "UNet": UNetConfig,
    "DiT": DiTConfig,
    "Identity": IdentityNetConfig,
    "AutoEncoder": AutoEncoderConfig,
    "ConvEncoderDecoder": ConvEncoderDecoderConfig,
}


def _describe(err: dict[str, Any], origin: dict[tuple, str], model: type[BaseModel]) -> str:
    raw_loc = tuple(str(p) for p in err["loc"])
    parent, parent_path = _resolve_parent(model, raw_loc[:-1])
    loc = (*parent_path, raw_loc[-1]) if raw_loc else raw_loc
    # name the key the way the user wrote it (flat files keep their flat names)
    shown = None
    for n in range(len(loc), 0, -1):
        if loc[:n] in origin:
            shown = ".".join([origin[loc[:n]], *loc[n:]])
            break
    shown = shown or ".".join(loc)
    if err["type"] == "extra_forbidden":
        known = list(parent.model_fields) if parent is not None else []
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key '{shown}'{suggestion}; known keys here: {', '.join(sorted(known))}"
    got = err.get("input")
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return f"'{shown}': {msg} (got {json.dumps(got, default=str)[:80]})"


def _resolve_parent(model: type[BaseModel], loc: tuple[str, ...]) -> tuple[type[BaseModel] | None, tuple[str, ...]]:
    """The model holding the key at the end of `loc`, and `loc` without pydantic's union tags."""
    path: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if part in _UNION_TAGS and (current is None or part not in current.model_fields):
            current = _UNION_TAGS[part]  # the union member pydantic chose; not a key the user wrote
            continue
        path.append(part)
        if current is None:
            continue
        ann = getattr(current.model_fields.get(part), "annotation", None)
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return current, tuple(path)


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


def config_from_dict(
    raw: dict[str, Any], source: str = "<config>", overrides: dict[str, Any] | None = None
) -> ModelConfig:
    """Validate a config dict in either format; `overrides` (nested or flat) are merged on top."""
    if _is_flat(raw):
        nested, origin = _flat_to_nested(raw)
    else:
        nested, origin = copy.deepcopy(raw), {}
    nested = _lift_structure(nested, source)
    if overrides:
        extra = _flat_to_nested(overrides)[0] if _is_flat(overrides) else copy.deepcopy(overrides)
        nested = deep_merge(nested, _lift_structure(extra, source))
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
    exp.translate = [resolve(p) for p in exp.translate]
    if not exp.config.exists():
        raise ConfigError(f"{path}: 'config' names {exp.config}, which does not exist")
    return exp
