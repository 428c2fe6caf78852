"""Reading and writing images: NIfTI, DICOM series, and the Volume type that carries geometry."""
