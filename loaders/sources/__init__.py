"""Source adapters: one per input layout (files, DICOM, EchoNet-Dynamic, CAMUS, CSV)."""
