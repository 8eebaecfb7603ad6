"""`gtrain export`: saved weights -> one ONNX, ExportedProgram (.pt2) or TorchScript file.

The file maps a float32 batch of normalised images, (N, in_chans, image_size,
image_size) for any N, to (N, num_classes) logits in eval mode; the image size is the
weights' own. It carries the weights' metadata (model, class names, mean, std, image
size) as the same strings as the .safetensors file, so it can be used on its own.

Before anything is written, the exported bytes are loaded back by the runtime that will
read them (onnxruntime, torch.export.load, torch.jit.load) and run on seeded random
images at two batch sizes; only if their logits match the PyTorch model's is the file
written, atomically, so no bad or half-written file ever lies under its final name.

    from gtrain.export import export_model
    result = export_model("runs/quickstart-20250101-120000", export_format="onnx")
    print(result.to_json())
"""

import contextlib
import dataclasses
import io
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gtrain.checkpoint import WeightsMeta
from gtrain.files import write_atomic
from gtrain.errors import UserError

# Format -> file suffix, appended to the weights' stem: best.safetensors -> best.onnx.
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2", "torchscript": ".torchscript.pt"}
ONNX_EXTRA = "pip install 'gtrain[onnx]'"
# torch.export turns a dimension whose example size is 0 or 1 into a constant, so the
# model is exported (and traced) on a batch of 2; any --batch-size is checked afterwards.
EXAMPLE_BATCH = 2
# Allowed max |exported - PyTorch| per unit of logit: float32 kernels that sum in another
# order (onnxruntime's convs, its DFT) differ by ~1e-6 relative (measured); a wrong graph by far more.
RELATIVE_TOLERANCE = 1e-4
META_FILE = "gtrain.json"  # name of the metadata entry inside .pt2 and TorchScript archives

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path
    size_bytes: int
    model: str
    image_size: int  # px; the file takes only this size
    checked: bool  # whether the written bytes were run and compared with PyTorch
    check_batch_sizes: tuple[int, ...]
    max_abs_diff: float | None  # over all checked logits; None when not checked
    tolerance: float | None
    note: str = ""  # why it was not checked, or what to know about the format

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "path": str(self.path)})


def export_model(
    path: Path, *, export_format: str, out: Path | None = None, batch_size: int = 2
) -> ExportResult:
    """Export the weights in a run folder (best, else final) or a .safetensors file, check, write."""
    from gtrain.checkpoint import load_model
    from gtrain.run_folder import weights_file

    if export_format not in SUFFIXES:
        raise UserError(f"unknown export format {export_format!r}: choose one of {', '.join(SUFFIXES)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if export_format == "onnx":
        require_onnx_exporter()
    weights = weights_file(Path(path))
    model, meta = load_model(weights)
    model.eval()
    target = output_path(out, weights, export_format)
    if target.resolve() == weights.resolve():
        raise UserError(f"--out {out} is the weights file itself: give another file name")
    batch_sizes = (batch_size, batch_size + 1)  # two sizes: the batch dimension must really be free
    with torch.no_grad():
        data = EXPORTERS[export_format](model, sample_images(EXAMPLE_BATCH, meta, seed=0), meta)
        run = RUNNERS[export_format](data)
        batches = [sample_images(n, meta, seed=n) for n in batch_sizes]
        diff, tolerance = compare_logits(run, model, batches) if run is not None else (None, None)
    if diff is not None and not diff <= tolerance:
        raise UserError(
            f"the exported {export_format} model's logits differ from PyTorch's by {diff:.3g} (tolerance "
            f"{tolerance:.3g}); nothing was written to {target}"
        )
    write_atomic(target, data)
    return ExportResult(
        format=export_format,
        path=target,
        size_bytes=len(data),
        model=meta.model,
        image_size=meta.image_size,
        checked=run is not None,
        check_batch_sizes=batch_sizes if run is not None else (),
        max_abs_diff=diff,
        tolerance=tolerance,
        note=format_note(export_format, checked=run is not None),
    )


def output_path(out: Path | None, weights: Path, export_format: str) -> Path:
    """--out as given, or <weights stem><suffix> in --out if it is a folder, else next to the weights."""
    name = weights.stem + SUFFIXES[export_format]
    if out is None:
        return weights.with_name(name)
    return Path(out) / name if Path(out).is_dir() else Path(out)


def sample_images(batch_size: int, meta: WeightsMeta, *, seed: int) -> torch.Tensor:
    """Standard-normal images: what normalised inputs look like, the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, meta.in_chans, meta.image_size, meta.image_size, generator=generator)


def compare_logits(run: Logits, model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Max |exported - PyTorch| over the batches, and the tolerance scaled to the largest logit."""
    worst, scale = 0.0, 1.0
    for images in batches:
        expected = model(images)
        got = run(images)
        if got.shape != expected.shape:
            return float("inf"), RELATIVE_TOLERANCE * scale
        # A NaN would compare False against any tolerance and slip through max(): count it as inf.
        diff = (got.float() - expected).abs().max().nan_to_num(nan=float("inf"))
        worst = max(worst, diff.item())
        scale = max(scale, expected.abs().max().item())
    return worst, RELATIVE_TOLERANCE * scale


def format_note(export_format: str, *, checked: bool) -> str:
    if not checked:
        return f"not checked: onnxruntime is not installed; {ONNX_EXTRA} enables the check"
    if export_format == "torchscript":
        return "TorchScript is deprecated in PyTorch; --format exported-program is its successor"
    return ""


# ----------------------------------------------------------------------------- exporters


def require_onnx_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  # torch.onnx.export's exporter builds the graph with it
    except ImportError:
        raise UserError(f"--format onnx needs the onnx and onnxscript packages: {ONNX_EXTRA}") from None


def export_onnx(model: nn.Module, example: torch.Tensor, meta: WeightsMeta) -> bytes:
    import onnx

    # The torch.export-based exporter (dynamo=True) translates HorNet-GF's rfft2 and
    # irfft2 into ONNX's DFT operator (opset 20); the older TorchScript-based one cannot.
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=["images"],
        output_names=["logits"],
        verbose=False,
    )
    proto = program.model_proto  # a fresh proto on every access: take it once
    onnx.helper.set_model_props(proto, meta.to_strings())
    return proto.SerializeToString()


def export_program(model: nn.Module, example: torch.Tensor, meta: WeightsMeta) -> bytes:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta.to_strings())})
    return buffer.getvalue()


def export_torchscript(model: nn.Module, example: torch.Tensor, meta: WeightsMeta) -> bytes:
    # Tracing, not scripting: torch.jit.script rejects both families' forward (ResNeXt's
    # getattr by name, HorNet's zip over two ModuleLists). The trace records no batch
    # size, and its input-size checks become constants: right for a file of one image size.
    with quiet_torchscript():
        traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={META_FILE: json.dumps(meta.to_strings())})
    return buffer.getvalue()


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch.jit's deprecation notices (the result's note says it once) and its
    warnings that HorNet's input-size checks are traced as constants (intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="`torch.jit", category=FutureWarning)
        yield


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, WeightsMeta], bytes]] = {
    "onnx": export_onnx,
    "exported-program": export_program,
    "torchscript": export_torchscript,
}


# ------------------------------------------------------------------------------- runners
# Each loads exported bytes as a user would load the file; None when the runtime is missing.


def run_onnx(data: bytes) -> Logits | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def run_program(data: bytes) -> Logits:
    return torch.export.load(io.BytesIO(data)).module()


def run_torchscript(data: bytes) -> Logits:
    with quiet_torchscript():
        return torch.jit.load(io.BytesIO(data))


RUNNERS: dict[str, Callable[[bytes], Logits | None]] = {
    "onnx": run_onnx,
    "exported-program": run_program,
    "torchscript": run_torchscript,
}
