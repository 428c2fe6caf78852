"""Runtime choices: device, determinism, thread counts, package and code versions."""

from __future__ import annotations

import logging
import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pipeline

log = logging.getLogger(__name__)

_PACKAGES = ("torch", "monai", "numpy", "nibabel", "pydicom", "scikit-learn", "scipy", "pydantic", "matplotlib",
             "isal")  # isal: the deflate of every .nii.gz written (its bytes)


def package_version(name: str) -> str:
    """``importlib.metadata.version(name)``, reading only the metadata's header lines: the standard call parses
    the whole file as an e-mail message (long descriptions included), ~2.5 ms a package, on every stage run."""
    dist = metadata.distribution(name)
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    for line in text.splitlines():
        if not line:  # the end of the header fields
            break
        if line.startswith("Version:"):
            return line[len("Version:"):].strip()
    return dist.version


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "medpipe": pipeline.__version__}
    for name in _PACKAGES:
        try:
            versions[name] = package_version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def code_version() -> str:
    """``<version>+g<commit>[.dirty]`` when running from a git checkout, else the package version."""
    root = Path(pipeline.__file__).resolve().parent.parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take the index lock of the user's repo
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True, env=env).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "pipeline"],
                               cwd=root, capture_output=True, text=True, timeout=10, check=True, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return pipeline.__version__
    return f"{pipeline.__version__}+g{commit}{'.dirty' if dirty else ''}"


def resolve_device(choice: str = "auto") -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import ConfigError

        raise ConfigError("device 'cuda' was asked for but CUDA is not available; use --set train.device=auto")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def device_description(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": device, "cpu": platform.processor() or platform.machine(),
                            "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy, torch and MONAI; deterministic algorithms where they exist."""
    import numpy as np
    import torch
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    set_determinism(seed=seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
