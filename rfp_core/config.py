"""Typed model and experiment configs, every default in one place.

Reading files is `rfp_core/config_files.py`: `load_config` takes both formats of the original
trainer (the flat form with `velocity_net`, `saliency_net`, `saliency_*` keys, and the nested form
with `codec`, `saliency`, `velocity` sections); both resolve to the same `ModelConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

Augmentation = Literal["color_jitter", "grayscale", "hflip", "random_erasing", "gaussian_blur"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
StructureEncoder = Literal["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "thumbnail", "hog"]
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
    # None = the original's limit (the velocity budget's steps, then on whatever the accuracy); a
    # number: an unreachable threshold then fails the phase (train/saliency_stop.py), never runs forever
    max_steps: int | None = Field(None, ge=1)
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
    # bf16 autocast of the velocity net (train/speed.py), as in the original; None = where the device
    # has bf16 kernels. The saliency loss's jvp stays float32.
    bf16: bool | None = None
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
    # this project's: std of Gaussian noise on the source X0 in training and translation, the randomness
    # a flow from a plain domain needs to draw the target's texture (docs/METHOD.md); 0 = off, the original
    source_noise: float = Field(0.0, ge=0)
    # train on every σ from this up to source_noise (one uniform draw a sample; None = source_noise
    # alone), so a translation at a lower translate_noise stays inside what the flow has seen
    source_noise_min: float | None = Field(None, ge=0)
    # σ of that noise at translation (None = source_noise): a lower "temperature" than training keeps
    # more of the input for less invented texture (docs/BENCHMARKS.md measures the trade)
    translate_noise: float | None = Field(None, ge=0)
    # keep only the noise's spatial frequencies coarser than this period in pixels (None = white
    # noise): the randomness that picks a background and texture, without grain the flow must remove
    source_noise_lowpass: float | None = Field(None, ge=2)
    # translate again, from each of these σ in turn, the outputs phase 1's domain classifier is less sure
    # are the target than it is of all but `translate_retry_quantile` of real target images (outputs
    # that stayed the input; train/retry_bar.py); [] = off. Phase 1 then trains whatever the loss.
    translate_retry_noise: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list)
    translate_retry_quantile: float = Field(0.1, gt=0, lt=1)
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
    def _noise_range(self) -> "VelocityConfig":
        if self.source_noise_min is not None and self.source_noise_min > self.source_noise:
            raise ValueError(
                f"source_noise_min ({self.source_noise_min}) is above source_noise ({self.source_noise}): "
                "the range is [source_noise_min, source_noise]"
            )
        return self

    @model_validator(mode="after")
    def _retry_rises(self) -> "VelocityConfig":
        levels = [self.translate_sigma, *self.translate_retry_noise]
        if any(b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError(
                f"translate_retry_noise {self.translate_retry_noise} must rise above the translation σ "
                f"({self.translate_sigma}): each retry adds noise to an output that kept too much of its input"
            )
        return self

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

    @property
    def translate_sigma(self) -> float:
        return self.source_noise if self.translate_noise is None else self.translate_noise


class StructureConfig(_Strict):
    pairing: bool = False
    candidates: int = Field(8, ge=1)
    encoder: StructureEncoder = "dinov2_vits14"
    # explicit weights file for the DINOv2 encoder; else the timm / HF cache is searched
    weights_path: Path | None = None
    thumbnail_size: int = Field(16, ge=4)
    hog_cells: int = Field(8, ge=2)  # the hog encoder's cells a side (8 pixels each)


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
    def saliency_step_limit(self) -> int:  # saliency.max_steps, or the original's: the velocity budget's steps
        return self.saliency.max_steps if self.saliency.max_steps is not None else max(1, self.velocity.total_steps)

    @property
    def generative(self) -> bool:
        return self.domain0 == "random"

    @property
    def needs_saliency(self) -> bool:
        """Phase 1 trains: the saliency loss weights by its net, the translation retry asks it."""
        v = self.velocity
        return not self.generative and (v.loss == "saliency" or bool(v.translate_retry_noise))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def flat_params(self) -> dict[str, str]:
        """Dotted-key view for trackers (MLflow params)."""
        return {
            k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in flatten(self.model_dump(mode="json")).items()
        }


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
