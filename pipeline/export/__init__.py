"""Exports for other tools: DICOM SEG from label volumes, TorchScript and ONNX from trained model folders."""

from __future__ import annotations
