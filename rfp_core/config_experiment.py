"""The experiment file (`experiments/*.json`) the pipeline and `rfp` read: which folders, which
model config, what to override. The model config it names is `rfp_core/config.py`'s `ModelConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from rfp_core.config import _Strict


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
    # "filenames": a domain-0 and a domain-1 file with the same stem are a true pair (rfp_core/flow/paired.py),
    # the velocity is fitted on those pairs, its loss defaults to plain MSE and structure pairing is off
    pairing: Literal["unpaired", "filenames"] = "unpaired"

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
