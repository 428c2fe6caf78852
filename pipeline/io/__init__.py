"""Reading and writing images: NIfTI, DICOM series, and the Volume type that carries geometry.

``nib`` is nibabel, imported here without letting it import pydicom: nibabel imports pydicom
eagerly, only to parse the rare NIfTI header extension that embeds a DICOM data set (code 2),
and pydicom brings its pixel plugins and an HTTP client with it, 0.15-0.4 s of a command on
2 cores. Commands that read no DICOM (NIfTI ingest, preprocess, evaluate, report, the infer
driver) thus never import it, and neither does DICOM ingest of explicit VR little endian files
(headers, PHI values and native pixels are read by medpipe's own walkers); it imports pydicom
for what those leave to it (implicit VR PHI values, enhanced multi-frame, compressed pixels,
big endian). A NIfTI DICOM extension stays opaque bytes (``Nifti1Extension``), which medpipe
never reads or copies. Modules take nibabel from here (``from pipeline.io import nib``) so that
the first import of nibabel is this one.

It is imported on first use, not with this package: the DICOM header readers
(``pipeline.io.dicom_header`` and what it imports) need neither nibabel nor numpy, so that
ingest can start reading headers while the rest of the command is still importing
(``pipeline.stages.ingest_prefetch``).
"""

from __future__ import annotations

import sys


def _import_nibabel_without_pydicom() -> None:
    if "nibabel" in sys.modules or "pydicom" in sys.modules:
        return  # imported already (by MONAI, say): nothing to save
    sys.modules["pydicom"] = None  # type: ignore[assignment]  # makes `import pydicom` fail: nibabel goes without
    try:
        import nibabel  # noqa: F401
    finally:
        del sys.modules["pydicom"]  # a later `import pydicom` imports it as usual


def __getattr__(name: str) -> object:
    if name == "nib":
        _import_nibabel_without_pydicom()
        import nibabel

        globals()["nib"] = nibabel  # later lookups find it without this function
        return nibabel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["nib"]
