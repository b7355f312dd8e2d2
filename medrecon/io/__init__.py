"""Input/output: DICOM and NIfTI ingest, DICOM export, synthetic phantoms."""
