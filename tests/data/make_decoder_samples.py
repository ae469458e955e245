"""Re-make the dcmtk-encoded decoder samples (see PROVENANCE.md): needs dcmtk's dcmcjpeg and dcmconv on PATH.

Run from the repository root: .venv/bin/python tests/data/make_decoder_samples.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from test_decoders import source_pixels, write_mr  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    src = write_mr(Path(tmp) / "src.dcm", source_pixels())
    subprocess.run(
        ["dcmcjpeg", "+ee", "+q", "90", "+sr", str(src), str(HERE / "mr12_jpeg_extended_dcmtk.dcm")], check=True
    )
    subprocess.run(["dcmconv", "+td", str(src), str(HERE / "mr12_deflated_dcmtk.dcm")], check=True)
