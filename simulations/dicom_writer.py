"""Write realistic MR DICOM series from numpy arrays: the phantom's output stage and the test-data writer.

Geometry follows DICOM exactly: `row_cosine` is ImageOrientationPatient[0:3], the direction in which the column index
grows (along a row); `col_cosine` is ImageOrientationPatient[3:6], the direction in which the row index grows.
PixelSpacing is (spacing between rows, spacing between columns), i.e. (step along col_cosine, step along row_cosine).
Patient coordinates are LPS millimetres (x → patient left, y → posterior, z → head). The pixel (r, c) of slice k lies at
`positions[k] + c * pixel_spacing[1] * row_cosine + r * pixel_spacing[0] * col_cosine`.

`write_series` takes real-world values (what a reader gets after RescaleSlope/Intercept) and stores
round((value − intercept) / slope), clipped to the unsigned stored range. With `monochrome1=True` the stored values are
inverted (max_stored − s), as a MONOCHROME1 scanner would store the same image; a reader that inverts gets it back.

Enhanced MR (`multiframe=True`) puts the acquisition parameters where the standard does: RepetitionTime in the shared
MRTimingAndRelatedParametersSequence, EffectiveEchoTime in MREchoSequence, InversionTimes in MRModifierSequence,
orientation in the shared PlaneOrientationSequence, spacing/thickness in the shared PixelMeasuresSequence, rescale in
the shared PixelValueTransformationSequence, and ImagePositionPatient per frame in PlanePositionSequence. There is no
top-level EchoTime/RepetitionTime/ImagePositionPatient in such a file. The other Type 1 MR functional groups (frame
type, anatomy, modifiers, coils, averages, FOV geometry), frame date-times, pulse-sequence and equipment attributes are
filled with plausible constants so that dicom3tools' dciodvfy finds no error (tests/test_phantom.py runs it).

Lossy storage is JPEG Extended (process 4) with 12-bit samples, encoded by GDCM, as lossy PACS archives hold MR;
JPEG baseline (8-bit) remains for tests only: the MR IODs allow 16-bit words only.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit)
JPEG_EXTENDED_QUALITY = 90  # IJG scale, as lossy archives commonly store MR
FILE_NAMES = ("uid", "opaque", "dcm")


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rotate(v: np.ndarray, axis: np.ndarray, deg: float) -> np.ndarray:
    """Rodrigues rotation of v about a unit axis."""
    t = np.deg2rad(deg)
    axis = _unit(axis)
    return v * np.cos(t) + np.cross(axis, v) * np.sin(t) + axis * np.dot(axis, v) * (1 - np.cos(t))


def _pair(x) -> tuple:
    return (x, x) if np.isscalar(x) else tuple(x)


@dataclass
class SliceGeometry:
    """Geometry of one series of parallel slices (see the module docstring for the DICOM conventions)."""

    row_cosine: np.ndarray
    col_cosine: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing = step along col_cosine, column spacing = step along row_cosine)
    rows: int
    cols: int
    positions: np.ndarray  # (n, 3) ImagePositionPatient: centre of the first (top-left) pixel of each slice
    slice_thickness: float

    def __post_init__(self):
        self.row_cosine = np.asarray(self.row_cosine, dtype=np.float64)
        self.col_cosine = np.asarray(self.col_cosine, dtype=np.float64)
        self.positions = np.atleast_2d(np.asarray(self.positions, dtype=np.float64))
        self.pixel_spacing = (float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))
        self.rows, self.cols = int(self.rows), int(self.cols)

    @property
    def n(self) -> int:
        return len(self.positions)

    @property
    def normal(self) -> np.ndarray:
        """row_cosine × col_cosine (the series' own normal; its sign is a vendor convention)."""
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def spacing_between_slices(self) -> float:
        if self.n < 2:
            return self.slice_thickness
        return float(np.median(np.abs(np.diff(self.positions @ self.normal))))

    def pixel_points(self, k: int) -> np.ndarray:
        """Patient coordinates (rows, cols, 3) of slice k's pixel centres."""
        r = np.arange(self.rows, dtype=np.float64)[:, None, None] * self.pixel_spacing[0]
        c = np.arange(self.cols, dtype=np.float64)[None, :, None] * self.pixel_spacing[1]
        return self.positions[k] + c * self.row_cosine + r * self.col_cosine

    def to_pixel(self, points: np.ndarray, k: int) -> np.ndarray:
        """(…, 3) patient points → (…, 2) fractional (row, col) in slice k's plane (the normal component dropped)."""
        d = np.asarray(points, dtype=np.float64) - self.positions[k]
        return np.stack([d @ self.col_cosine / self.pixel_spacing[0], d @ self.row_cosine / self.pixel_spacing[1]], -1)

    @classmethod
    def sagittal(
        cls,
        center_xyz,
        fov_mm,
        matrix,
        n_slices: int,
        spacing_mm: float,
        mirrored: bool = False,
        flipped_normal: bool = False,
        transposed: bool = False,
        tilt_deg: float = 0.0,
        yaw_deg: float = 0.0,
        thickness_mm: float | None = None,
        descending: bool = False,
    ) -> SliceGeometry:
        """Sagittal slices centred on `center_xyz` (the middle of the middle slice).

        `fov_mm`, `matrix`: scalar or (rows, cols). Variants (all map pixels to the right patient points):
        - canonical: row_cosine (0,1,0) (columns anterior → posterior), col_cosine (0,0,−1) (rows superior →
          inferior); normal −x.
        - mirrored: row_cosine (0,−1,0) (columns posterior → anterior); normal +x.
        - flipped_normal: col_cosine (0,0,+1) (rows inferior → superior, stored upside down); normal flips.
        - mirrored + flipped_normal: the image rotated 180° in-plane; normal −x again.
        - transposed: row and col cosines swapped after the above (rows run A→P, columns S→I); normal flips.
        - tilt_deg rotates both cosines in-plane about the normal (oblique sagittal); yaw_deg turns the slice plane
          about the patient z axis (slices not exactly parallel to the mid-sagittal plane).
        Slice positions step along +normal from first to last (−normal with `descending=True`).
        """
        rows, cols = (int(v) for v in _pair(matrix))
        fov_r, fov_c = (float(v) for v in _pair(fov_mm))
        row = np.array([0.0, -1.0 if mirrored else 1.0, 0.0])
        col = np.array([0.0, 0.0, 1.0 if flipped_normal else -1.0])
        if transposed:
            row, col = col, row
        normal = np.cross(row, col)
        if tilt_deg:
            row, col = _rotate(row, normal, tilt_deg), _rotate(col, normal, tilt_deg)
        if yaw_deg:
            z = np.array([0.0, 0.0, 1.0])
            row, col = _rotate(row, z, yaw_deg), _rotate(col, z, yaw_deg)
        return cls._stack(
            center_xyz, row, col, fov_r, fov_c, rows, cols, n_slices, spacing_mm, thickness_mm, descending
        )

    @classmethod
    def axial(
        cls,
        center_xyz,
        fov_mm,
        matrix,
        n_slices: int,
        spacing_mm: float,
        tilt_deg: float = 0.0,
        thickness_mm: float | None = None,
    ) -> SliceGeometry:
        """Axial slices (row_cosine +x, col_cosine +y, normal +z), e.g. an axial T2 distractor series.

        tilt_deg angles the slices about the patient x axis, as when axials are aligned with a disc.
        """
        rows, cols = (int(v) for v in _pair(matrix))
        fov_r, fov_c = (float(v) for v in _pair(fov_mm))
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
        if tilt_deg:
            x = np.array([1.0, 0.0, 0.0])
            col = _rotate(col, x, tilt_deg)
        return cls._stack(center_xyz, row, col, fov_r, fov_c, rows, cols, n_slices, spacing_mm, thickness_mm, False)

    @classmethod
    def coronal(
        cls, center_xyz, fov_mm, matrix, n_slices: int, spacing_mm: float, thickness_mm: float | None = None
    ) -> SliceGeometry:
        """Coronal slices (row_cosine +x, col_cosine −z, normal +y), e.g. one plane of a localizer."""
        rows, cols = (int(v) for v in _pair(matrix))
        fov_r, fov_c = (float(v) for v in _pair(fov_mm))
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])
        return cls._stack(center_xyz, row, col, fov_r, fov_c, rows, cols, n_slices, spacing_mm, thickness_mm, False)

    @classmethod
    def _stack(cls, center, row, col, fov_r, fov_c, rows, cols, n, spacing, thickness, descending) -> SliceGeometry:
        row, col = _unit(row), _unit(col)
        normal = np.cross(row, col)
        ps = (fov_r / rows, fov_c / cols)
        offsets = (np.arange(n) - (n - 1) / 2.0) * spacing * (-1.0 if descending else 1.0)
        corner = -row * (cols - 1) / 2.0 * ps[1] - col * (rows - 1) / 2.0 * ps[0]
        positions = np.asarray(center, dtype=np.float64) + corner + offsets[:, None] * normal
        return cls(row, col, ps, rows, cols, positions, float(thickness if thickness is not None else spacing))


@dataclass
class SeriesSpec:
    """Acquisition and header description of one series."""

    description: str
    weighting: str  # "T1", "T2", "STIR", "T1C", "LOC", "AX_T2", ...: informational, not written as such
    repetition_time: float
    echo_time: float
    inversion_time: float | None = None
    scanning_sequence: str = "SE"  # "SE", "IR", "GR" (multi-valued as "SE\\IR" allowed)
    sequence_variant: str = "SK"
    scan_options: str = ""
    contrast_agent: str | None = None
    image_type: list[str] = field(default_factory=lambda: ["ORIGINAL", "PRIMARY", "M", "NONE"])
    manufacturer: str = "SIEMENS"
    model_name: str = "Avanto"
    field_strength: float = 1.5
    series_number: int = 1
    echo_train_length: int | None = None
    flip_angle: float = 90.0
    body_part: str = "LSPINE"


@dataclass
class PatientInfo:
    patient_id: str
    name: str
    birth_date: str  # YYYYMMDD
    sex: str  # "M", "F", "O"
    age: int


@dataclass(frozen=True)
class WrittenSlice:
    sop_instance_uid: str
    instance_number: int
    frame: int | None  # 1-based frame number in a multi-frame file; None for single-frame files
    path: Path


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ds_float(x: float) -> str:
    """DS values are limited to 16 characters: keep as many significant digits as fit (geometry needs them)."""
    for digits in range(12, 4, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{x:.4e}"


def _ds_list(v) -> list[str]:
    return [_ds_float(float(x)) for x in v]


def to_stored(pixels: np.ndarray, bits: int, slope: float, intercept: float, monochrome1: bool) -> np.ndarray:
    """Real-world values → unsigned stored integers (see the module docstring)."""
    top = (1 << bits) - 1
    stored = np.clip(np.rint((np.asarray(pixels, dtype=np.float64) - intercept) / slope), 0, top)
    if monochrome1:
        stored = top - stored
    return stored.astype(np.uint8 if bits <= 8 else np.uint16)


def _jpeg_baseline_frames(stored: np.ndarray, quality: int = 95) -> list[bytes]:
    from PIL import Image

    frames = []
    for img in stored:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), mode="L").save(buf, format="JPEG", quality=quality)
        frames.append(buf.getvalue())
    return frames


def jpeg_extended_frames(stored: np.ndarray, bits: int = 12, quality: int = JPEG_EXTENDED_QUALITY) -> list[bytes]:
    """Encode (n, rows, cols) unsigned samples of up to 12 bits as JPEG Extended process 4 streams, one per frame.

    GDCM (python-gdcm, a runtime dependency) does the encoding. Its JPEG codec picks the 8-, 12- or 16-bit libjpeg from
    BitsAllocated: declared as 16-bit words it writes a 16-bit-precision SOF1, which JPEG Extended does not allow and
    dcmtk refuses to decode; declared as 12 bits it writes the 12-bit process-4 stream a PACS archive holds (the
    samples are still read from 16-bit words).
    """
    import gdcm

    if not 8 < bits <= 12:
        raise ValueError("JPEG Extended stores 9..12-bit samples here (8-bit MR is not allowed by the MR IOD)")
    rows, cols = stored.shape[1:]
    out = []
    for img in stored:
        # An ImageWriter owns the image: a free-standing gdcm.Image is released while GDCM still holds references.
        holder = gdcm.ImageWriter()
        image = holder.GetImage()
        image.SetNumberOfDimensions(2)
        image.SetDimensions((cols, rows, 1))
        image.SetPixelFormat(gdcm.PixelFormat(1, 12, bits, bits - 1, 0))
        image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
        image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ImplicitVRLittleEndian))
        element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
        element.SetByteStringValue(np.ascontiguousarray(img, dtype="<u2").tobytes())
        image.SetDataElement(element)
        codec = gdcm.JPEGCodec()
        codec.SetLossless(False)
        codec.SetQuality(int(quality))
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
        change.SetUserCodec(codec)
        change.SetInput(image)
        if not change.Change():
            raise RuntimeError("GDCM could not encode JPEG Extended")
        fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments()
        # python-gdcm returns bytes as str; surrogateescape recovers them.
        out.append(fragments.GetFragment(0).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape"))
    return out


def _patient_study(ds: Dataset, patient: PatientInfo, study_uid: str, study_date: str, spec: SeriesSpec) -> None:
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{int(patient.age):03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.AccessionNumber = hashlib.sha1(study_uid.encode()).hexdigest()[:10].upper()
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR LUMBAR SPINE"
    ds.Modality = "MR"
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.model_name
    ds.MagneticFieldStrength = _ds_float(spec.field_strength)
    ds.BodyPartExamined = spec.body_part
    ds.PatientPosition = "HFS"
    ds.SeriesDescription = spec.description
    ds.SeriesNumber = int(spec.series_number)
    ds.ImageType = list(spec.image_type)
    if spec.contrast_agent:
        ds.ContrastBolusAgent = spec.contrast_agent


def _image_pixel(ds: Dataset, rows: int, cols: int, bits: int, monochrome1: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0


def _window(stored_real: np.ndarray) -> tuple[str, str]:
    lo, hi = np.percentile(stored_real, [1, 99.5])
    return _ds_float((lo + hi) / 2), _ds_float(max(hi - lo, 1.0))


def _file_name(mode: str, out_dir: Path, sop_uid: str, series_number: int, instance: int) -> Path:
    if mode == "uid":
        return out_dir / f"{sop_uid}.dcm"
    if mode == "dcm":
        return out_dir / f"S{series_number:03d}_I{instance:04d}.dcm"
    # Opaque PACS-export names: the next free IMnnnnn in the folder, without extension.
    i = 1 + sum(1 for p in out_dir.iterdir() if p.name.startswith("IM")) if out_dir.exists() else 1
    while (out_dir / f"IM{i:05d}").exists():
        i += 1
    return out_dir / f"IM{i:05d}"


def _finish(ds: Dataset, stored: np.ndarray, transfer_syntax: str) -> None:
    """Attach pixel data in the requested transfer syntax."""
    multi = stored.shape[0] > 1 or "NumberOfFrames" in ds
    arr = stored if multi else stored[0]
    if transfer_syntax in UNCOMPRESSED:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax == JPEGBaseline8Bit:
        if ds.BitsAllocated != 8:
            raise ValueError("JPEG baseline needs bits=8")
        ds.PixelData = encapsulate(_jpeg_baseline_frames(stored))
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    elif transfer_syntax == JPEGExtended12Bit:
        # MONOCHROME1 is stored inverted already; the codec only needs grey samples.
        frames = jpeg_extended_frames(stored, ds.BitsStored)
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = _ds_float(stored.nbytes / max(sum(len(f) for f in frames), 1))
    elif transfer_syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds.compress(transfer_syntax, arr, generate_instance_uid=False)
    else:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _acquisition_ms(spec: SeriesSpec, phase_lines: int) -> float:
    """Scan time of a 2-D turbo spin echo: TR × phase-encoding lines ÷ echo train length (one average)."""
    return float(spec.repetition_time) * phase_lines / max(int(spec.echo_train_length or 1), 1)


def _enhanced_image_description(ds: Dataset, spec: SeriesSpec) -> None:
    """Image-level attributes of the Enhanced MR Image module (MR Image Description and Common CT/MR macros)."""
    ds.AcquisitionContrast = {"T1": "T1", "T2": "T2", "STIR": "T2", "T1C": "T1"}.get(spec.weighting, "MIXED")
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ContentQualification = "PRODUCT"


def _enhanced_equipment_and_sequence(ds: Dataset, spec: SeriesSpec) -> None:
    """Enhanced General Equipment (Type 1 there) and the MR Pulse Sequence module, as a 2-D (turbo) spin echo or a
    gradient-echo localizer is described by its scanner."""
    ds.DeviceSerialNumber = hashlib.sha1(f"{spec.manufacturer}/{spec.model_name}".encode()).hexdigest()[:8].upper()
    ds.SoftwareVersions = "SPINEFED_SIM 1"
    gradient = "GR" in spec.scanning_sequence
    ds.PulseSequenceName = spec.description[:16]
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "GRADIENT" if gradient else "SPIN"
    ds.MultipleSpinEcho = "NO" if gradient else "YES"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT" if "FS" in spec.scan_options else "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE" if gradient else "PARTIAL"
    ds.NumberOfKSpaceTrajectories = 1


def _enhanced_shared_mr_groups(shared: Dataset, ds: Dataset, spec: SeriesSpec) -> None:
    """The Type 1 MR functional groups that hold for every frame of one acquisition, in the shared item."""
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    for key in ("PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique",
                "ComplexImageComponent", "AcquisitionContrast"):  # fmt: skip
        setattr(frame_type, key, ds.get(key))
    shared.MRImageFrameTypeSequence = DicomSequence([frame_type])

    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = DicomSequence([_code("122496007", "SCT", "Lumbar spine")])
    anatomy.FrameLaterality = "U"
    shared.FrameAnatomySequence = DicomSequence([anatomy])

    timing = shared.MRTimingAndRelatedParametersSequence[0]
    gradient = "GR" in spec.scanning_sequence
    timing.RFEchoTrainLength = 1 if gradient else int(spec.echo_train_length or 1)
    timing.GradientEchoTrainLength = 1 if gradient else 0
    sar = Dataset()
    sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
    sar.SpecificAbsorptionRateValue = 0.8
    timing.SpecificAbsorptionRateSequence = DicomSequence([sar])
    modes = []
    for kind in ("STATIC FIELD", "RF", "GRADIENT"):
        mode = Dataset()
        mode.OperatingModeType, mode.OperatingMode = kind, "IEC_NORMAL"
        modes.append(mode)
    timing.OperatingModeSequence = DicomSequence(modes)

    modifier = Dataset()
    modifier.InversionRecovery = "YES" if spec.inversion_time is not None else "NO"
    if spec.inversion_time is not None:
        modifier.InversionTimes = [float(spec.inversion_time)]  # FD
    modifier.FlowCompensation = "NONE"
    modifier.T2Preparation = "NO"
    modifier.SpatialPresaturation = "NONE"
    modifier.PartialFourier = "NO"
    modifier.ParallelAcquisition = "NO"
    modifier.SpectrallySelectedExcitation = "NONE"
    shared.MRModifierSequence = DicomSequence([modifier])

    imaging = Dataset()
    imaging.MagnetizationTransfer = "NONE"
    imaging.BloodSignalNulling = "NO"
    imaging.Tagging = "NONE"
    imaging.TransmitterFrequency = [42.577 * spec.field_strength]  # FD, MHz
    imaging.PixelBandwidth = 200.0  # FD, Hz per pixel
    shared.MRImagingModifierSequence = DicomSequence([imaging])

    receive = Dataset()
    receive.ReceiveCoilName = "SPINE"
    receive.ReceiveCoilManufacturerName = spec.manufacturer
    receive.ReceiveCoilType = "SURFACE"
    receive.QuadratureReceiveCoil = "NO"
    shared.MRReceiveCoilSequence = DicomSequence([receive])
    transmit = Dataset()
    transmit.TransmitCoilName = "BODY"
    transmit.TransmitCoilManufacturerName = spec.manufacturer
    transmit.TransmitCoilType = "BODY"
    shared.MRTransmitCoilSequence = DicomSequence([transmit])

    fov = Dataset()
    # Phase encoding along the rows (anterior-posterior in a sagittal spine), full k-space, square field of view.
    fov.InPlanePhaseEncodingDirection = "ROW"
    fov.MRAcquisitionFrequencyEncodingSteps = int(ds.Columns)
    fov.MRAcquisitionPhaseEncodingStepsInPlane = int(ds.Rows)
    fov.PercentSampling = 100.0  # FD
    fov.PercentPhaseFieldOfView = 100.0  # FD
    shared.MRFOVGeometrySequence = DicomSequence([fov])

    averages = Dataset()
    averages.NumberOfAverages = 1.0  # FD
    shared.MRAveragesSequence = DicomSequence([averages])


def write_series(
    out_dir: str | Path,
    pixels: np.ndarray,
    geometry: SliceGeometry,
    spec: SeriesSpec,
    patient: PatientInfo,
    study_uid: str,
    *,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    instance_numbers: Sequence[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    multiframe: bool = False,
    monochrome1: bool = False,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    bits: int = 16,
    file_names: str = "uid",
    study_date: str = "20240115",
    rng: np.random.Generator | None = None,
) -> list[WrittenSlice]:
    """Write `pixels` (n, rows, cols; real-world values) as one MR series; returns one WrittenSlice per input slice.

    UIDs are deterministic: drawn from `rng` when given, else derived from study_uid, patient and series number.
    `instance_numbers` (default 1..n) may be in any order relative to position, to test ordering. With
    `multiframe=True` one Enhanced MR file is written and `instance_numbers` are the 1-based frame numbers at which
    each input slice is stored (a permutation of 1..n), so frames too can be out of positional order.
    The frame of reference defaults to one per study, shared by all its series.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    n, rows, cols = pixels.shape
    if (rows, cols) != (geometry.rows, geometry.cols) or n != geometry.n:
        raise ValueError(
            f"pixels {pixels.shape} do not match geometry ({geometry.n}, {geometry.rows}, {geometry.cols})"
        )
    if file_names not in FILE_NAMES:
        raise ValueError(f"file_names must be one of {FILE_NAMES}")
    if transfer_syntax == JPEGBaseline8Bit:
        bits = 8
    elif transfer_syntax == JPEGExtended12Bit:
        bits = 12  # what lossy archives hold for MR (process 4)
    if not 8 <= bits <= 16:
        raise ValueError("bits must be 8..16")
    numbers = list(range(1, n + 1)) if instance_numbers is None else [int(i) for i in instance_numbers]
    if len(numbers) != n:
        raise ValueError("instance_numbers must have one entry per slice")
    if multiframe and sorted(numbers) != list(range(1, n + 1)):
        raise ValueError("for a multi-frame file instance_numbers must be a permutation of 1..n (frame numbers)")

    salt = int(rng.integers(0, 2**62)) if rng is not None else 0
    base = (salt, study_uid, patient.patient_id, spec.series_number, spec.description)
    series_uid = series_uid or _uid("series", *base)
    for_uid = frame_of_reference_uid or _uid("frame-of-reference", study_uid)
    stored = to_stored(pixels, bits, rescale_slope, rescale_intercept, monochrome1)
    real = stored.astype(np.float64) * rescale_slope + rescale_intercept
    window = _window(real)
    normal = geometry.normal
    spacing = geometry.spacing_between_slices

    def common(ds: Dataset, sop_class: str, sop_uid: str) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "SPINEFED_SIM"
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        _patient_study(ds, patient, study_uid, study_date, spec)
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        _image_pixel(ds, rows, cols, bits, monochrome1)

    written: list[WrittenSlice] = []
    if not multiframe:
        for k in range(n):
            sop_uid = _uid("sop", *base, k)
            ds = Dataset()
            common(ds, MR_IMAGE_STORAGE, sop_uid)
            ds.InstanceNumber = numbers[k]
            ds.AcquisitionNumber = 1
            ds.ImagePositionPatient = _ds_list(geometry.positions[k])
            ds.ImageOrientationPatient = _ds_list(np.concatenate([geometry.row_cosine, geometry.col_cosine]))
            ds.PixelSpacing = _ds_list(geometry.pixel_spacing)
            ds.SliceThickness = _ds_float(geometry.slice_thickness)
            ds.SpacingBetweenSlices = _ds_float(spacing)
            ds.SliceLocation = _ds_float(float(geometry.positions[k] @ normal))
            ds.RepetitionTime = _ds_float(spec.repetition_time)
            ds.EchoTime = _ds_float(spec.echo_time)
            if spec.inversion_time is not None:
                ds.InversionTime = _ds_float(spec.inversion_time)
            ds.ScanningSequence = spec.scanning_sequence.split("\\")
            ds.SequenceVariant = spec.sequence_variant.split("\\")
            ds.ScanOptions = spec.scan_options.split("\\") if spec.scan_options else ""
            ds.MRAcquisitionType = "2D"
            ds.FlipAngle = _ds_float(spec.flip_angle)
            ds.EchoTrainLength = int(spec.echo_train_length or 1)  # Type 2 in the MR Image module, localizers too
            ds.ImagingFrequency = _ds_float(42.577 * spec.field_strength)
            ds.RescaleSlope = _ds_float(rescale_slope)
            ds.RescaleIntercept = _ds_float(rescale_intercept)
            ds.RescaleType = "US"
            ds.WindowCenter, ds.WindowWidth = window
            _finish(ds, stored[k : k + 1], transfer_syntax)
            path = _file_name(file_names, out_dir, sop_uid, spec.series_number, numbers[k])
            ds.save_as(path, enforce_file_format=True)
            written.append(WrittenSlice(sop_uid, numbers[k], None, path))
        return written

    # Enhanced MR: frame f (1-based) holds input slice order[f-1].
    order = np.argsort(numbers)
    sop_uid = _uid("sop-enhanced", *base)
    ds = Dataset()
    common(ds, ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    ds.ImageType = (list(spec.image_type) + ["NONE", "NONE", "NONE", "NONE"])[:4]
    ds.InstanceNumber = 1
    ds.ContentTime = "101500"
    start = study_date + "101500"
    ds.AcquisitionDateTime = start
    duration_ms = _acquisition_ms(spec, rows)
    ds.AcquisitionDuration = duration_ms / 1000.0  # FD, seconds
    ds.NumberOfFrames = n
    _enhanced_image_description(ds, spec)
    _enhanced_equipment_and_sequence(ds, spec)
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = DicomSequence([])  # Type 2: present, empty

    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = _ds_list(np.concatenate([geometry.row_cosine, geometry.col_cosine]))
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = _ds_list(geometry.pixel_spacing)
    measures.SliceThickness = _ds_float(geometry.slice_thickness)
    measures.SpacingBetweenSlices = _ds_float(spacing)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    timing = Dataset()
    timing.RepetitionTime = _ds_float(spec.repetition_time)
    timing.FlipAngle = _ds_float(spec.flip_angle)
    timing.EchoTrainLength = int(spec.echo_train_length or 1)
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = float(spec.echo_time)  # FD, not DS
    shared.MREchoSequence = DicomSequence([echo])
    transform = Dataset()
    transform.RescaleSlope = _ds_float(rescale_slope)
    transform.RescaleIntercept = _ds_float(rescale_intercept)
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    _enhanced_shared_mr_groups(shared, ds, spec)
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = window
    shared.FrameVOILUTSequence = DicomSequence([voi])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    dim_uid = _uid("dimension", *base)
    dim = Dataset()
    dim.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = DicomSequence([dim])
    idx = Dataset()
    idx.DimensionOrganizationUID = dim_uid
    idx.DimensionIndexPointer = pydicom.tag.Tag("InStackPositionNumber")
    idx.FunctionalGroupPointer = pydicom.tag.Tag("FrameContentSequence")
    ds.DimensionIndexSequence = DicomSequence([idx])

    # InStackPositionNumber counts along +normal, as the standard's "stack" implies.
    rank = np.argsort(np.argsort(geometry.positions @ normal)) + 1
    per_frame = []
    for f in range(n):
        k = int(order[f])
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = _ds_list(geometry.positions[k])
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        # One 2-D multi-slice acquisition: every frame shares its start and duration.
        content.FrameAcquisitionDateTime = start
        content.FrameReferenceDateTime = start
        content.FrameAcquisitionDuration = duration_ms  # FD, milliseconds
        content.StackID = "1"
        content.InStackPositionNumber = int(rank[k])
        content.DimensionIndexValues = [int(rank[k])]
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _finish(ds, stored[order], transfer_syntax)
    path = _file_name(file_names, out_dir, sop_uid, spec.series_number, 1)
    ds.save_as(path, enforce_file_format=True)
    return [WrittenSlice(sop_uid, 1, numbers[k], path) for k in range(n)]


def sample_volume(fn: Callable[[np.ndarray], np.ndarray], geometry: SliceGeometry) -> np.ndarray:
    """Evaluate fn (patient points (..., 3) → values (...)) on every pixel centre: (n, rows, cols) float32."""
    pts = np.stack([geometry.pixel_points(k) for k in range(geometry.n)])
    return np.asarray(fn(pts), dtype=np.float32).reshape(geometry.n, geometry.rows, geometry.cols)
