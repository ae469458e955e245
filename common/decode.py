"""Pixel decoding of one frame, with permissively licensed decoders only.

pydicom decodes most syntaxes through its plugins (GDCM, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls). Two things
that PACS archives hold fall through its gaps and are handled here:
- JPEG Extended with 12-bit samples (processes 2/4, lossy archives): pydicom refuses to hand it to GDCM and the only
  other plugin (pylibjpeg-libjpeg) is GPL, so GDCM is called directly; GDCM also backs up any other compressed syntax
  that pydicom's plugins decline.
- Deflated Explicit VR Little Endian: pydicom's file-path decoder reads the raw stream without inflating it, so such a
  file is read whole (dcmread inflates) and decoded from the dataset.
Colour and palette images are refused with the reason: palette indices or one colour channel are not MR signal.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
)

log = logging.getLogger(__name__)

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
# Read before any decoding: enough to refuse colour and to choose a decoder, without the pixel data.
_HEADER_TAGS = [
    Tag(kw)
    for kw in ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation")
]


class UnsupportedImage(ValueError):
    """A file that decodes but whose pixels are not greyscale signal (colour, palette); the message is the reason."""


def check_greyscale(ds: Dataset) -> None:
    """Raise UnsupportedImage unless the image is single-sample MONOCHROME1/2."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        raise UnsupportedImage("PALETTE COLOR image: its pixels are colour-table indices, not MR signal")
    if samples != 1 or photometric not in GREYSCALE:
        raise UnsupportedImage(f"colour image ({photometric or 'no PhotometricInterpretation'}): not greyscale MR")


def decode_frame(path: str | Path, index: int | None = None) -> np.ndarray:
    """Stored values of one frame (`index` 0-based; None for a single-frame file) as a 2-D array.

    No rescale and no MONOCHROME1 inversion here: that is the caller's (common.dicom.read_pixels). Decoder warnings go
    to this module's log rather than the console.
    """
    path = str(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _decode(path, index)
        finally:
            for w in caught:
                # the whole path, last: the prepare log replaces it by the file's pseudonym (a bare file name would
                # pass, and names in hospital exports can be patient names)
                log.warning("decoder warning: %s; in %s", " ".join(str(w.message).split()), path)


def _decode(path: str, index: int | None) -> np.ndarray:
    if index is None:
        # A single-frame file: read once, header and pixels, and decode from the data set (reading the header first
        # and then handing pydicom the path parsed the header twice: a quarter of the time a stack took).
        ds = pydicom.dcmread(path, force=True)
        check_greyscale(ds)
        return _decode_dataset(ds, None)
    # One frame of a multi-frame file: the header alone, then pydicom reads only that frame's pixel data.
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
    check_greyscale(header)
    syntax = UID(str(header.file_meta.get("TransferSyntaxUID", "") or ""))
    if not syntax or syntax == DeflatedExplicitVRLittleEndian or _gdcm_only(syntax, header):
        return _decode_dataset(pydicom.dcmread(path, force=True), index)
    try:
        return pydicom.pixels.pixel_array(path, index=index)
    except (NotImplementedError, RuntimeError) as exc:
        if not syntax.is_compressed:
            raise
        return _gdcm_instead(pydicom.dcmread(path, force=True), index, exc)


def _gdcm_only(syntax: UID, ds: Dataset) -> bool:
    return syntax == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8


def _gdcm_instead(ds: Dataset, index: int | None, exc: Exception) -> np.ndarray:
    try:
        return gdcm_frame(ds, index)
    except ValueError as gdcm_exc:
        name = UID(str(ds.file_meta.TransferSyntaxUID)).name
        raise ValueError(f"no decoder for {name}: pydicom: {exc}; GDCM: {gdcm_exc}") from None


def _decode_dataset(ds: Dataset, index: int | None) -> np.ndarray:
    """One frame of a data set read whole, pixels included."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
    if not syntax:  # a data set without the Part-10 header (common.dicom reads those): the encoding pydicom found
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        return pydicom.pixels.pixel_array(ds, index=index)
    if _gdcm_only(syntax, ds):
        return gdcm_frame(ds, index)
    try:
        return pydicom.pixels.pixel_array(ds, index=index)
    except (NotImplementedError, RuntimeError) as exc:
        if not syntax.is_compressed:
            raise
        return _gdcm_instead(ds, index, exc)


def rle_frame(buf: bytes, pos: int, rows: int, cols: int, bits: int, stored: int, signed: int) -> np.ndarray | None:
    """The stored values of a single-frame RLE Lossless image from its file's bytes, as pydicom returns them, or None
    where pydicom should decode (pylibjpeg-rle missing, pixel data not as expected, a decoding error: pydicom then
    says what is wrong). `pos`: the pixel data element (explicit VR little endian, encapsulated); the header's values
    are checked by the caller (greyscale, one sample, no signed samples with unused bits).

    pydicom decodes RLE with pylibjpeg-rle too, but reading the whole data set and setting up its decoder cost four
    times the decoding itself: this finds the fragments with the fast header walk's position and decodes them as one
    frame (a single-frame image's fragments are its frame), unused high bits cleared as pydicom does.
    """
    try:
        from rle import decode_pixel_data  # pylibjpeg-rle (MIT), as pydicom's plugin calls it
    except ImportError:
        return None
    if bits not in (8, 16) or buf[pos + 4 : pos + 6] != b"OB" or buf[pos + 8 : pos + 12] != b"\xff\xff\xff\xff":
        return None
    pos += 12
    fragments = []
    first = True  # the first item is the Basic Offset Table, not pixel data
    while True:
        if pos + 8 > len(buf):
            return None
        group, element, length = struct.unpack_from("<HHI", buf, pos)
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF or pos + length > len(buf):
            return None
        if not first:
            fragments.append(buf[pos : pos + length])
        first = False
        pos += length
    try:
        decoded = decode_pixel_data(b"".join(fragments), version=2, rows=rows, columns=cols, bits_allocated=bits)
    except (ValueError, RuntimeError):
        return None
    if len(decoded) != rows * cols * bits // 8:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    arr = np.frombuffer(decoded, dtype=dtype).reshape(rows, cols)
    return arr & dtype.type((1 << stored) - 1) if stored < bits else arr


_JPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
}


def jpeg_precision(stream: bytes) -> int | None:
    """Sample precision declared by a JPEG stream's SOF marker segment (None when there is none before the scan)."""
    pos = 2  # after SOI
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return stream[pos + 4] if pos + 4 < len(stream) else None
        if marker == 0xDA:  # start of scan: no SOF before it
            return None
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return None


def gdcm_frame(ds: Dataset, index: int | None = None) -> np.ndarray:
    """One encapsulated frame decoded by GDCM itself (python-gdcm, BSD), honouring bits, signedness and frames.

    GDCM picks its JPEG decoder (8, 12 or 16 bit) from BitsAllocated and, for a 12-bit stream in 16-bit words, first
    tries the 16-bit one, which prints to the process's stderr before falling back; telling it the stream's own
    precision picks the right decoder at once.
    """
    import gdcm

    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    k = 0 if index is None else int(index)
    if not 0 <= k < frames:
        raise ValueError(f"frame {k + 1} requested from a file of {frames} frames")
    if "PixelData" not in ds or not ds["PixelData"].is_undefined_length:
        raise ValueError("no encapsulated pixel data")
    stream = pydicom.encaps.get_frame(ds.PixelData, k, number_of_frames=frames)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    stored = int(ds.get("BitsStored", ds.BitsAllocated))
    precision = jpeg_precision(stream) if syntax in _JPEG_SYNTAXES else None
    allocated = int(ds.BitsAllocated) if precision is None else (8 if precision <= 8 else 12 if precision <= 12 else 16)

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(stream)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(str(ds.PhotometricInterpretation).strip())
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    image.SetPixelFormat(gdcm.PixelFormat(1, allocated, min(stored, allocated), min(stored, allocated) - 1, signed))
    # python-gdcm hands the buffer back as str; surrogateescape recovers the original bytes.
    raw = image.GetBuffer().encode("utf-8", "surrogateescape")
    out = image.GetPixelFormat()  # GDCM widens e.g. 12-bit samples to 16-bit words while decoding
    bits = out.GetBitsAllocated()
    if bits not in (8, 16, 32) or len(raw) != rows * cols * bits // 8:
        raise ValueError(f"GDCM could not decode the frame ({len(raw)} bytes of {bits}-bit samples)")
    dtype = np.dtype(f"<{'i' if out.GetPixelRepresentation() == 1 else 'u'}{bits // 8}")
    return np.frombuffer(raw, dtype=dtype).reshape(rows, cols).copy()
