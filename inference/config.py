"""One typed configuration per run: what is trained on what data, with which guide, and how it is evaluated.

A :class:`RunConfig` gathers the dataclasses that the rest of the library takes (``DataConfig``,
``ModelConfig``, :class:`GuideConfig`, ``TrainConfig``, :class:`EvalConfig`) and the device. It is written
once, as ``config.json`` in the run folder, before training starts; ``python -m inference.train --config
RUN/config.json --out NEW`` trains the same run again, and experiment grids derive their runs from one config
with :func:`dataclasses.replace`. Its :meth:`RunConfig.fingerprint`, the hash of what decides the training
trajectory (not the evaluation, the GPU index or where the data files live), is what a resumed run must match.

Example::

    >>> cfg = RunConfig()
    >>> cfg2 = RunConfig.from_dict(cfg.to_dict())
    >>> cfg2 == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guides.factory import GuideKind, InitLoc
from inference.checkpoint import atomic_write, config_fingerprint, differing_settings, to_jsonable
from inference.data import DataConfig
from inference.svi import TrainConfig
from models.config import ModelConfig, check_positive_float, check_positive_int

CONFIG_FILENAME = "config.json"
"""The run folder's copy of its :class:`RunConfig`."""


@dataclass(frozen=True)
class GuideConfig:
    """The variational family (:func:`guides.make_guide`) and how it starts."""

    kind: GuideKind = GuideKind.HYBRID
    init_scale: float = 0.1
    init_loc: InitLoc = InitLoc.XAVIER

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", GuideKind(self.kind))
            object.__setattr__(self, "init_loc", InitLoc(self.init_loc))
        except ValueError as err:
            raise ValueError(f"{err}; guides: {[k.value for k in GuideKind]}, init locs: "
                             f"{[i.value for i in InitLoc]}") from None
        check_positive_float("init_scale", self.init_scale)


@dataclass(frozen=True)
class EvalConfig:
    """Test-time settings: S transformations and M weight draws in the predictive, passes for the ELBO."""

    num_transforms: int = 32  # S at evaluation
    num_samples: int = 32  # M weight draws from q averaged in the posterior predictive
    elbo_passes: int = 4  # passes over the training set for the reported ELBO / N

    def __post_init__(self) -> None:
        for name in ("num_transforms", "num_samples", "elbo_passes"):
            check_positive_int(name, getattr(self, name))


def _check_device(device: str) -> str:
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return str(device)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (see the module docstring)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", _check_device(self.device))
        expected = self.data.image_shape
        if self.model.image_shape != expected:
            raise ValueError(f"the model's image_shape {self.model.image_shape} does not fit the images of "
                             f"{self.data.dataset.value}, {expected}: set ModelConfig(image_shape="
                             "data_config.image_shape)")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (enums as values, tuples as lists); ``seed`` repeated at the top for readers."""
        return {**to_jsonable(self), "seed": self.train.seed}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (the file was written by other code)."""
        parts = {"data": DataConfig, "model": ModelConfig, "guide": GuideConfig, "train": TrainConfig,
                 "eval": EvalConfig}
        unknown = sorted(set(values) - set(parts) - {"device", "seed"})
        if unknown:
            raise ValueError(f"unknown run config section(s) {unknown}")
        kwargs: dict[str, Any] = {"device": values.get("device", "cpu")}
        for name, cls_ in parts.items():
            section = dict(values.get(name, {}))
            known = {f.name for f in dataclasses.fields(cls_)}
            extra = sorted(set(section) - known)
            if extra:
                raise ValueError(f"unknown {name} setting(s) {extra} in the run config")
            kwargs[name] = cls_(**{k: _tuples(v) for k, v in section.items()})
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` atomically; returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        """Read a ``config.json`` (a run folder is accepted too)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILENAME
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read a run config from {path}: {err}") from None
        return cls.from_dict(values)

    # ------------------------------------------------------------------ identity
    def training_dict(self) -> dict[str, Any]:
        """What decides the training trajectory, as JSON: the config stamped on the run's checkpoints."""
        return {**_training_part(self.to_dict()), "device": torch.device(self.device).type}

    def fingerprint(self) -> str:
        """Hash of :meth:`training_dict`: a resumed run must match it."""
        return config_fingerprint(self.training_dict())


def _training_part(values: dict[str, Any]) -> dict[str, Any]:
    """The sections of a :meth:`RunConfig.to_dict` that decide training, less where the data files live (a
    folder may be moved or spelled otherwise)."""
    data = {k: v for k, v in values.get("data", {}).items() if k not in ("data_dir", "allow_download")}
    return {"data": data, **{k: values.get(k, {}) for k in ("model", "guide", "train")}}


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config dataclasses hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def derive(cfg: RunConfig, **sections: Any) -> RunConfig:
    """``cfg`` with some settings changed, section by section (:func:`dataclasses.replace` on each).

    The model's ``image_shape`` follows a change of data (dataset, canvas) unless ``model`` sets it. Example:
    ``derive(cfg, model={"hidden": 8}, train={"seed": 2}, device="cuda")``.
    """
    changes: dict[str, Any] = {}
    for name, values in sections.items():
        if name == "device":
            changes[name] = values
        elif values:
            changes[name] = dataclasses.replace(getattr(cfg, name), **values)
    if "data" in changes and "image_shape" not in (sections.get("model") or {}):
        model = changes.get("model", cfg.model)
        changes["model"] = dataclasses.replace(model, image_shape=changes["data"].image_shape)
    return dataclasses.replace(cfg, **changes)


def same_run(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The settings (``"train.eta_lr"``, ...) in which a finished run's config (``metrics.json["config"]``) differs
    from ``cfg`` in what decides its training, whatever the device; empty when it is that run."""
    return [name for name, _, _ in differing_settings(_training_part(saved), _training_part(cfg.to_dict()))]
