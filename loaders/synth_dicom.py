"""Multi-frame ultrasound DICOM writer for the synthetic corpus (uncompressed MONOCHROME2).

Written the way a scanner exports a cine: Ultrasound Multi-frame Image Storage, one
8-bit grey plane per frame, `FrameTime`/`CineRate` for the frame rate, burned-in text
flagged, and a patient name/ID that ingest must hash. UIDs derive from the clip name
and seed, so the same seed writes byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
"""SOP class: Ultrasound Multi-frame Image Storage."""


def write_dicom(path: str | Path, video: np.ndarray, *, fps: int, patient: str, name: str,
                seed: int) -> None:
    """Write `video` (uint8 [F, H, W] grey) as one multi-frame DICOM file at `path`."""
    frames, height, width = video.shape
    uid = lambda part: generate_uid(entropy_srcs=[f"echofm-synth/{seed}/{name}/{part}"])  # noqa: E731

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_MULTIFRAME
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(f"study/{patient}")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "US"
    ds.Manufacturer = "EchoFM synthetic phantom"
    ds.PatientName = f"SYNTH^{patient.upper()}"
    ds.PatientID = patient
    ds.StudyDate = "20260101"  # fixed: byte-identical output for a seed
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.NumberOfFrames = frames
    ds.FrameTime = f"{1000.0 / fps:.4f}"
    ds.CineRate = fps
    ds.RecommendedDisplayFrameRate = fps
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)  # -> FrameTime
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(video, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
