"""Name -> factory registries (networks, losses) that answer a typo with "did you mean"."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.errors import ConfigError


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' hint for ``name`` among ``choices`` ('' when nothing is close)."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry:
    """Maps names to lazily imported factories (``"module:function"``) so config checks stay cheap."""

    def __init__(self, kind: str, entries: dict[str, str]) -> None:
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _unknown(self, name: str, *, noun: str = "network") -> str:
        return (f"unknown {noun} '{name}'.{did_you_mean(name, self._entries)} "
                f"Choose one of: {', '.join(self.names())}")

    def validate(self, name: str) -> str:
        """For config validators: ``name`` itself, or ValueError with a did-you-mean."""
        if name not in self._entries:
            raise ValueError(self._unknown(name))
        return name

    def check(self, name: str, *, where: str) -> str:
        if name not in self._entries:
            raise ConfigError(f"{where}: {self._unknown(name, noun=self.kind)}")
        return name

    def get(self, name: str, *, where: str = "config") -> Callable[..., Any]:
        target = self._entries[self.check(name, where=where)]
        module_name, _, attr = target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


SEGMENTATION_NETWORKS = Registry(
    "segmentation network",
    {
        "dynunet": "pipeline.models.segmenters:build_dynunet",
        "unet": "pipeline.models.segmenters:build_unet",
        "basic_unet": "pipeline.models.segmenters:build_basic_unet",
        "segresnet": "pipeline.models.segmenters:build_segresnet",
        "attention_unet": "pipeline.models.segmenters:build_attention_unet",
        "swin_unetr": "pipeline.models.segmenters:build_swin_unetr",
    },
)

CLASSIFICATION_NETWORKS = Registry(
    "classification network",
    {
        "resnet10": "pipeline.classification.networks:build_resnet10",
        "resnet18": "pipeline.classification.networks:build_resnet18",
        "resnet50": "pipeline.classification.networks:build_resnet50",
        "densenet121": "pipeline.classification.networks:build_densenet121",
        "efficientnet-b0": "pipeline.classification.networks:build_efficientnet_b0",
        "seresnet50": "pipeline.classification.networks:build_seresnet50",
        "segmentation_encoder": "pipeline.classification.encoder:build_segmentation_encoder",
    },
)

NORMALIZATIONS = ("zscore", "zscore_nonzero", "ct", "none")
