"""Versions recorded in every stage's provenance."""

from __future__ import annotations

from importlib import metadata

import pytest

from pipeline.runtime import _PACKAGES, package_version, package_versions


@pytest.mark.parametrize("name", [*_PACKAGES, "pytest", "pyyaml", "isal", "tqdm"])
def test_package_version_is_importlib_metadatas(name: str) -> None:
    """package_version reads only the metadata's header lines; it must agree with importlib.metadata."""
    try:
        expected = metadata.version(name)
    except metadata.PackageNotFoundError:
        with pytest.raises(metadata.PackageNotFoundError):
            package_version(name)
        return
    assert package_version(name) == expected


def test_missing_packages_are_named_so() -> None:
    with pytest.raises(metadata.PackageNotFoundError):
        package_version("no-such-package-medpipe-test")
    versions = package_versions()
    assert versions["numpy"] == metadata.version("numpy")
    assert set(_PACKAGES) <= set(versions)
