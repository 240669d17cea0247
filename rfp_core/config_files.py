"""Reading config files: the original trainer's flat and nested layouts, this project's own, and
validation errors as did-you-mean messages naming the file and the key. The typed configs and every
default are in `rfp_core/config.py`."""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from rfp_core.config import (
    AutoEncoderConfig,
    ConfigError,
    ConvEncoderDecoderConfig,
    DiTConfig,
    IdentityNetConfig,
    ModelConfig,
    UNetConfig,
)
from rfp_core.config_experiment import ExperimentConfig
from rfp_core.paths import resolve_against_root

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


def experiment_model_config(exp: ExperimentConfig) -> ModelConfig:
    """The experiment's model config: its config file with its overrides; paired experiments fit plain MSE."""
    cfg = load_config(exp.config, overrides=exp.overrides)
    if exp.pairing != "filenames":
        return cfg
    if exp.generative:
        raise ConfigError(f"experiment {exp.name}: 'pairing': 'filenames' needs domain-0 files, not 'random'")
    velocity = exp.overrides.get("velocity", {}) if isinstance(exp.overrides.get("velocity"), dict) else {}
    # the pix2pix setting: the coupling is given, plain MSE fits it; an override may still name a loss
    named = "loss" in exp.overrides or "loss" in velocity
    return cfg.model_copy(
        update={
            "velocity": cfg.velocity if named else cfg.velocity.model_copy(update={"loss": "mse"}),
            "structure": cfg.structure.model_copy(update={"pairing": False}),
        }
    )
