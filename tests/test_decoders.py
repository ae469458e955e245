"""Pixel decoding of what PACS archives hold (common/decode.py through common.dicom.read_pixels).

Encoded files come from two independent encoders: dcmtk (shipped in tests/data, see PROVENANCE.md there) and GDCM
(python-gdcm, converting a file as `gdcmconv` would, here in the test). Decoded pixels must equal the source pixels
(lossless syntaxes) or stay within a lossy tolerance; colour and palette images are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from common.decode import UnsupportedImage, gdcm_frame, jpeg_precision
from common.dicom import Frame, read_pixels
from common.geometry import Plane

gdcm = pytest.importorskip("gdcm")

DATA = Path(__file__).parent / "data"
MR = "1.2.840.10008.5.1.4.1.1.4"


def source_pixels(frames: int = 3, rows: int = 48, cols: int = 40, bits: int = 12, signed: bool = False) -> np.ndarray:
    """Smooth anatomy-like structure plus fine texture, different in every frame, spanning most of the stored range.

    tests/data/make_decoder_samples.py writes the shipped files from exactly these values.
    """
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    top = (1 << bits) - 1
    out = []
    for k in range(frames):
        disk = ((yy - rows / 2 - 3 * k) ** 2 + (xx - cols / 3) ** 2) < (rows / 4) ** 2
        img = 0.15 + 0.5 * xx / cols + 0.25 * disk + 0.04 * np.sin(xx * 1.3 + yy * 0.7 + k)
        out.append(np.clip(np.rint(img * top * 0.9), 0, top))
    arr = np.stack(out)
    if signed:
        arr = arr - (1 << (bits - 1))
    return arr.astype(np.int16 if signed else np.uint16)


def write_mr(path: Path, pixels: np.ndarray, bits: int = 12, signed: bool = False, **tags) -> Path:
    """An uncompressed MR image (multi-frame when pixels has more than one frame)."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MR, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "DEC01", "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    if pixels.ndim == 3 and pixels.shape[0] > 1:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def gdcm_convert(src: Path, dst: Path, syntax: str, near: int | None = None) -> Path:
    """Re-encode a file with GDCM, as `gdcmconv` does."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    if near is not None:
        codec = gdcm.JPEGLSCodec()
        codec.SetLossless(False)
        codec.SetLossyError(near)
        change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    assert str(pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    return dst


def frame_of(path: Path, index: int | None) -> Frame:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    plane = Plane(np.zeros(3), np.array([0.0, 1, 0]), np.array([0.0, 0, -1]), (1.0, 1.0), ds.Rows, ds.Columns)
    return Frame(str(path), str(ds.SOPInstanceUID), 1, None if index is None else index + 1, plane)


def pixels_of(path: Path, index: int | None = None) -> np.ndarray:
    """What a stack gets: read_pixels (rescale 1/0, MONOCHROME2) as integers again."""
    return np.rint(read_pixels(frame_of(path, index))).astype(np.int64)


def test_jpeg_extended_12bit_from_dcmtk_decodes_within_lossy_tolerance():
    """A real process-4 stream (12-bit SOF1) made by dcmtk's dcmcjpeg: pydicom alone refuses it (GDCM plugin
    declined, libjpeg plugin GPL and absent)."""
    path = DATA / "mr12_jpeg_extended_dcmtk.dcm"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.BitsStored == 12
    assert jpeg_precision(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=3)) == 12
    src = source_pixels().astype(np.int64)
    for k in range(3):
        got = pixels_of(path, k)
        err = np.abs(got - src[k])
        # quality 90 on 12 bits: small mean error; and the right frame (frames differ by far more than that)
        assert err.mean() < 0.004 * 4095 and err.max() < 0.05 * 4095, (k, err.mean(), err.max())
        other = src[(k + 1) % 3]
        assert np.abs(got - other).mean() > 5 * err.mean()


def test_deflated_explicit_vr_from_dcmtk_decodes_exactly():
    path = DATA / "mr12_deflated_dcmtk.dcm"
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    src = source_pixels().astype(np.int64)
    for k in range(3):
        assert np.array_equal(pixels_of(path, k), src[k])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("syntax", [JPEGLossless, JPEGLosslessSV1, DeflatedExplicitVRLittleEndian])
def test_lossless_syntaxes_encoded_by_gdcm_decode_exactly(tmp_path, syntax, signed):
    src = source_pixels(bits=12, signed=signed)
    plain = write_mr(tmp_path / "src.dcm", src, signed=signed)
    path = gdcm_convert(plain, tmp_path / "enc.dcm", syntax)
    for k in range(3):
        assert np.array_equal(pixels_of(path, k), src[k].astype(np.int64))


def test_jpeg_ls_near_lossless_stays_within_its_bound(tmp_path):
    src = source_pixels(bits=16)
    plain = write_mr(tmp_path / "src.dcm", src, bits=16)
    path = gdcm_convert(plain, tmp_path / "near.dcm", JPEGLSNearLossless, near=3)
    for k in range(3):
        err = np.abs(pixels_of(path, k) - src[k].astype(np.int64))
        assert err.max() <= 3 and err.any()  # really lossy, and within NEAR


@pytest.mark.parametrize("signed", [False, True])
def test_gdcm_path_honours_signedness_and_frames(tmp_path, signed):
    """The direct GDCM decoder (used where pydicom declines) on a syntax pydicom also decodes: identical results."""
    src = source_pixels(bits=12, signed=signed)
    plain = write_mr(tmp_path / "src.dcm", src, signed=signed)
    path = gdcm_convert(plain, tmp_path / "sv1.dcm", JPEGLosslessSV1)
    ds = pydicom.dcmread(path)
    for k in (2, 0):
        got = gdcm_frame(ds, k)
        assert got.dtype == (np.int16 if signed else np.uint16)
        assert np.array_equal(got, src[k])
    with pytest.raises(ValueError, match="frame 4"):
        gdcm_frame(ds, 3)


def _colour(tmp_path: Path, photometric: str) -> Path:
    rows, cols = 16, 20
    ds_tags = {}
    if photometric == "PALETTE COLOR":
        arr = (np.arange(rows * cols) % 256).astype(np.uint8).reshape(rows, cols)
        lut = list(range(0, 65536, 256))
        ds_tags = {
            "RedPaletteColorLookupTableDescriptor": [256, 0, 16],
            "GreenPaletteColorLookupTableDescriptor": [256, 0, 16],
            "BluePaletteColorLookupTableDescriptor": [256, 0, 16],
            "RedPaletteColorLookupTableData": np.array(lut, np.uint16).tobytes(),
            "GreenPaletteColorLookupTableData": np.array(lut[::-1], np.uint16).tobytes(),
            "BluePaletteColorLookupTableData": np.array(lut, np.uint16).tobytes(),
        }
        samples = 1
    else:
        arr = np.zeros((rows, cols, 3), np.uint8)
        arr[..., 0] = 200
        samples = 3
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture, as colour exports are
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for key, value in ds_tags.items():
        setattr(ds, key, value)
    ds.PixelData = arr.tobytes()
    path = tmp_path / f"{photometric.replace(' ', '_')}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "photometric, reason",
    [("PALETTE COLOR", "PALETTE COLOR image"), ("RGB", r"colour image \(RGB\)"), ("YBR_FULL", "colour image")],
)
def test_colour_and_palette_images_are_refused_with_the_reason(tmp_path, photometric, reason):
    path = _colour(tmp_path, photometric)
    with pytest.raises(UnsupportedImage, match=reason) as info:
        read_pixels(frame_of(path, None))
    assert "not" in str(info.value) and len(str(info.value)) <= 80  # whole even where a reason is cut at 80


def test_jpeg_precision_reads_the_sof_segment():
    ds = pydicom.dcmread(DATA / "mr12_jpeg_extended_dcmtk.dcm")
    stream = pydicom.encaps.get_frame(ds.PixelData, 1, number_of_frames=3)
    assert stream[:2] == b"\xff\xd8" and jpeg_precision(stream) == 12
    assert jpeg_precision(b"\xff\xd8\xff\xda\x00\x02") is None


def test_a_palette_colour_t1_series_skips_the_patient_with_the_reason(tmp_path):
    """End to end through `client prepare`: palette indices were taken as grey levels and the patient came out ok."""
    import csv

    from dicomfactory import write_manifest, write_patient, write_site_yaml

    from client.cli import main as client_main

    data = tmp_path / "data"
    data.mkdir()
    rows = [write_patient(data, "GREY1"), write_patient(data, "PALETTE1")]
    lut = np.linspace(0, 65535, 256).astype(np.uint16).tobytes()
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        if ds.PatientID != "PALETTE1" or ds.SeriesDescription != "t1_tse_sag":
            continue
        # the same images exported as a palette colour picture: 8-bit indices into a grey-looking colour table
        index = (ds.pixel_array.astype(np.float64) * 255 / max(int(ds.pixel_array.max()), 1)).astype(np.uint8)
        ds.PhotometricInterpretation = "PALETTE COLOR"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        for k in range(3):  # red, green, blue descriptors (0028,1101-1103) and data (0028,1201-1203)
            ds.add_new(0x00281101 + k, "US", [256, 0, 16])
            ds.add_new(0x00281201 + k, "OW", lut)
        ds.PixelData = index.tobytes()
        ds["PixelData"].VR = "OB"
        ds.save_as(path)
    write_manifest(data, rows)
    config = write_site_yaml(tmp_path)
    assert client_main(["prepare", "--config", str(config), "--quiet", "--workers", "1"]) == 0
    with (tmp_path / "cache" / "index.csv").open(encoding="utf-8") as fh:
        index = {r["patient_id"]: r for r in csv.DictReader(fh)}
    assert index["GREY1"]["status"] == "ok"
    assert index["PALETTE1"]["status"] == "skipped"
    assert "PALETTE COLOR image" in index["PALETTE1"]["reason"]


@pytest.mark.parametrize(
    "bits, stored, signed, fragments",
    [(16, 12, 0, 1), (16, 16, 0, 1), (16, 16, 1, 1), (8, 8, 0, 1), (16, 12, 0, 3)],
)
def test_rle_single_frames_are_read_from_their_bytes_as_pydicom_decodes_them(tmp_path, bits, stored, signed, fragments):
    """RLE Lossless single frames are decoded from the file's bytes (common.decode.rle_frame, via the fast header
    walk) to exactly pydicom's values: unused high bits cleared, a frame split into several fragments joined."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels.encoders import RLELosslessEncoder

    from common.decode import decode_frame
    from common.dicom import native_pixels

    # values over the whole allocated range: with 12 bits stored, the 4 high bits are set and must be cleared
    values = np.random.default_rng(bits + stored + signed).integers(0, 2**bits, size=(37, 29)).astype(f"<u{bits // 8}")
    values = values.view(f"<i{bits // 8}") if signed else values
    path = write_mr(tmp_path / "rle.dcm", values[None], bits=stored, signed=bool(signed))
    ds = pydicom.dcmread(path)
    ds.BitsAllocated = bits
    encoded = RLELosslessEncoder.encode(ds, encoding_plugin="pydicom")
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([encoded], fragments_per_frame=fragments)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)

    got = native_pixels(str(path))
    want = decode_frame(path)  # pydicom, from the whole data set
    assert got is not None  # the fast path took it
    assert got.dtype == want.dtype and np.array_equal(got, want)
    if stored < bits:
        assert got.max() < 2**stored and values.max() >= 2**stored


def test_rle_that_does_not_decode_goes_to_pydicom(tmp_path):
    """A damaged RLE stream is left to pydicom (None here), which says what is wrong."""
    from pydicom.encaps import encapsulate

    from common.dicom import native_pixels

    path = write_mr(tmp_path / "bad.dcm", source_pixels(1))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"\x7f"])  # one segment, cut short
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    assert native_pixels(str(path)) is None
    with pytest.raises(Exception):  # noqa: B017 (pydicom's own error; the stack builder words it)
        read_pixels(frame_of(path, None))
