"""Import a model from any framework so that it obeys the artifact contract.

An ONNX file exported by PyTorch, TensorFlow (tf2onnx), PaddlePaddle (paddle2onnx) or
anything else comes with its own input name, layout, dtype, normalization and channel
order. What the graph states (input size, layout, element type, channels, outputs) is
read from it; the rest is *declared* at import (nothing is guessed), and whether a
classifier returns logits is measured on real images. All of it is folded into a
wrapper graph around the unchanged original. One job per module:

* :mod:`.spec` — what is declared (:class:`ImportSpec`, parsed once from :class:`ImportRequest`);
* :mod:`.resolve` — what the graph says: the one reading of its dims (``-1``, ``0``, any
  ``dim_param`` or none are dynamic), ``auto`` options filled, declarations checked;
* :mod:`.safe_load` — refuse engines and pickles, vet ONNX external data, ``onnx.checker``;
* :mod:`.wrap` — the wrapper graph (preprocessing in, probabilities or decoded boxes out);
* :mod:`.reference` — the original run by hand (numpy), logits or probabilities, the parity check;
* :mod:`.samples` — real images for that check;
* :mod:`.register` — :func:`import_onnx`: all of the above, then the card and the registry;
* :mod:`.convert` — other formats converted to ONNX first (:func:`.convert.convert_to_onnx`, by
  what the file is), parity-checked against their own runtime; :mod:`.convert_torch` holds the
  TorchScript and ``--from-python`` (``nn.Module``) converters.

A PyTorch checkpoint of a built-in architecture is imported by ``train.checkpoint_import``
(``edge_export`` never imports ``train``), which also holds ``import_model``, the
by-suffix choice between the two.
"""

from edge_export.importer.reference import (
    ImportParity,
    ImportParityError,
    OutputCheck,
    check_import_parity,
    output_kind,
    reference_detections,
    run_original,
)
from edge_export.importer.convert import (
    ConversionInfo,
    ConversionParityError,
    convert_to_onnx,
    import_converted,
    import_python,
    source_format,
)
from edge_export.importer.register import card_preprocessing, import_onnx, source_sha256
from edge_export.importer.resolve import (
    DetectionHead,
    GraphIO,
    normalize_dynamic_dims,
    read_dim,
    resolve_detection_head,
    resolve_spec,
)
from edge_export.importer.safe_load import CHECKPOINT_SUFFIXES, check_source_file, load_onnx_safely
from edge_export.importer.samples import load_sample_images, sample_images
from edge_export.importer.spec import (
    GRAY_WEIGHTS,
    BoxFormat,
    ChannelOrder,
    DetectionOptions,
    HeadLayout,
    ImportRequest,
    ImportSpec,
    InputDType,
    Layout,
    OutputKind,
    PixelScale,
    Preprocessing,
    parse_labels,
    rgb_to_gray,
)
from edge_export.importer.wrap import MIN_OPSET, WrapInfo, wrap_onnx
from visionfleet.imaging import ResizeMode  # ImportSpec.resize takes it
from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME, OUTPUT_NAME  # the contract's names

__all__ = [
    "Layout",
    "InputDType",
    "ChannelOrder",
    "PixelScale",
    "OutputKind",
    "HeadLayout",
    "BoxFormat",
    "DetectionHead",
    "resolve_detection_head",
    "ConversionInfo",
    "ConversionParityError",
    "convert_to_onnx",
    "import_converted",
    "import_python",
    "source_format",
    "Preprocessing",
    "DetectionOptions",
    "ImportSpec",
    "ImportRequest",
    "ImportParityError",
    "WrapInfo",
    "ImportParity",
    "ResizeMode",
    "load_onnx_safely",
    "check_source_file",
    "wrap_onnx",
    "check_import_parity",
    "reference_detections",
    "sample_images",
    "load_sample_images",
    "parse_labels",
    "GraphIO",
    "read_dim",
    "normalize_dynamic_dims",
    "resolve_spec",
    "run_original",
    "OutputCheck",
    "output_kind",
    "GRAY_WEIGHTS",
    "rgb_to_gray",
    "import_onnx",
    "card_preprocessing",
    "source_sha256",
    "CHECKPOINT_SUFFIXES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DETECTION_OUTPUTS",
    "MIN_OPSET",
]
