"""Video files of the synthetic corpus: MP4/H.264 and AVI/MJPEG through PyAV, multi-frame
ultrasound DICOM through pydicom. Same clip and seed -> byte-identical files: single-threaded
encoders (parallelism is across clips), DICOM UIDs derived from the clip, a fixed date."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# container -> (encoder, pixel format, options): short GOP and no B-frames, like a scanner export
_CODECS = {
    "mp4": ("libx264", "yuv420p", {"preset": "ultrafast", "crf": "18", "g": "16", "bf": "0"}),
    "avi": ("mjpeg", "yuvj420p", {"qmin": "2", "qmax": "4"}),
}


def write_video(path: str | Path, video: np.ndarray, fps: int, container: str) -> None:
    """Encode grey uint8 [F, H, W] as MP4/H.264 ('mp4') or AVI/MJPEG ('avi') with PyAV."""
    import av

    n, h, w = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path}: yuv420 needs even frame sizes, got {h}x{w}")
    if container not in _CODECS:
        raise ValueError(f"{path}: container must be one of {sorted(_CODECS)}, got {container!r}")
    codec, pix, opts = _CODECS[container]
    chroma = np.full((h // 2, w), 128, np.uint8)  # grey: neutral U and V planes
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix
        stream.codec_context.thread_count = 1
        stream.options = opts
        for f in range(n):
            frame = av.VideoFrame.from_ndarray(np.concatenate([video[f], chroma]), format=pix)
            frame.pts = f
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
"""SOP class: Ultrasound Multi-frame Image Storage."""


def write_dicom(path: str | Path, video: np.ndarray, *, fps: int, patient: str, study: str, name: str,
                seed: int) -> None:
    """Write `video` (uint8 [F, H, W] grey) as one multi-frame DICOM file at `path`.

    Written the way a scanner exports a cine: uncompressed MONOCHROME2, one 8-bit plane per
    frame, `FrameTime`/`CineRate` for the frame rate, burned-in text flagged, a patient
    name/ID that ingest must hash, and a StudyInstanceUID derived from `study` (clips of
    one study share it)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames, height, width = video.shape
    uid = lambda part: generate_uid(entropy_srcs=[f"echofm-synth/{part}"])  # noqa: E731
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME
    meta.MediaStorageSOPInstanceUID = uid(f"{seed}/{name}/sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_MULTIFRAME
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(f"study/{study or patient}")
    ds.SeriesInstanceUID = uid(f"{seed}/{name}/series")
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
