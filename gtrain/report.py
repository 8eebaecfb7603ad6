"""`gtrain report`: one self-contained HTML file that shows what a run learned and what it gets
wrong: the recipe and its provenance, the curves, the confusion matrix as a heat map, per-class
precision and recall, the most confused pairs with examples, the highest-loss images with
where the model looked (Grad-CAM), and with `compare` a second run beside it.

The file loads nothing from elsewhere: images are inline JPEGs, charts inline SVG, and its
Content-Security-Policy allows no script at all, so a class named like an HTML tag is text.
Images are shown as the model saw them at evaluation (the same resize and crop), before
normalising.

Grad-CAM (Selvaraju et al. 2017) is computed here with autograd on the model's own
`forward_features` / `forward_head` split, which every gtrain model has: the last stage's
feature map, weighted per channel by the mean gradient of the class score. That is about
twenty lines, the same for ResNeXt and HorNet; pytorch-grad-cam would add a dependency and
hooks to find the layer by name for each family.
"""

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from gtrain.errors import UserError
from gtrain.evaluate import EvalSettings, ScoredWeights, score_weights, worst_images
from gtrain.files import write_text_atomic
from gtrain.run_folder import RunFolder, RunStatus

MAX_MATRIX_CLASSES = 40  # beyond this, the matrix shows the classes with the most mistakes
PAIRS, PAIR_EXAMPLES = 6, 4
THUMBNAIL_PX = 112  # images are shown at least this wide (small ones scaled up without smoothing)


@dataclass(frozen=True)
class ReportSettings:
    split: str = "val"
    out: Path | None = None  # default: RUN/report.html
    compare: Path | None = None  # a second run, side by side
    gallery: int = 24  # the highest-loss images shown (what `gtrain eval --worst N` lists)
    device: str = "auto"
    overrides: tuple[str, ...] = ()  # `--set data.*`, as for `gtrain eval`


@dataclass
class RunView:
    """One run, scored, with what its folder says about it."""

    folder: Path
    scored: ScoredWeights
    status: dict[str, Any]  # run.json
    metrics: list[dict[str, Any]]  # metrics.jsonl
    recipe_text: str

    @property
    def name(self) -> str:
        return self.folder.name


def write_report(run: Path, settings: ReportSettings = ReportSettings(), *, progress: Callable | None = None) -> Path:
    """Score `run` (and `settings.compare`) on `settings.split` and write the report; its path.
    `progress(description, total)` returns a callable given each batch's image count."""
    runs = [view_run(run, settings, progress)]
    if settings.compare is not None:
        runs.append(view_run(settings.compare, settings, progress))
    out = settings.out or runs[0].folder / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out}: the report is an HTML file; give a name ending in .html")
    page = render(runs, settings)
    try:
        write_text_atomic(out, page)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror}; choose a writable --out") from None
    return out


def view_run(run: Path, settings: ReportSettings, progress: Callable | None) -> RunView:
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    paths = RunFolder(folder)
    eval_settings = EvalSettings(split=settings.split, overrides=settings.overrides, device=settings.device)
    counted = None if progress is None else lambda total: progress(f"scoring {folder.name} ({settings.split})", total)
    scored = score_weights(Path(run), eval_settings, progress=counted)
    metrics = []
    if paths.metrics.is_file():
        metrics = [json.loads(line) for line in paths.metrics.read_text().splitlines() if line.strip()]
    recipe_text = paths.recipe.read_text() if paths.recipe.is_file() else scored.recipe.to_toml()
    return RunView(folder, scored, RunStatus.read(paths), metrics, recipe_text)


# ---------------------------------------------------------------------------------------------
# Images: as the model saw them, and where it looked
# ---------------------------------------------------------------------------------------------


def model_input(scored: ScoredWeights, index: int) -> torch.Tensor:
    """Image `index` of the split as the evaluation gave it to the model: uint8 (C, H, W)."""
    image = scored.dataset[index][0]
    if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8):
        raise UserError("gtrain report shows images of uint8 evaluation pipelines; this split gives others")
    return image


def grad_cam(model: torch.nn.Module, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) normalised inputs, the class to explain for each -> (N, H, W) in [0, 1]:
    how much each place of the last stage's feature map raised that class's score."""
    with torch.enable_grad():
        features = model.forward_features(inputs.float())  # (N, channels, h, w)
        scores = model.forward_head(features).gather(1, classes[:, None]).sum()
        (gradients,) = torch.autograd.grad(scores, features)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # (N, channels, 1, 1): each channel's importance
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (N, H, W)
    peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12)[:, None, None]
    return (cam / peak).detach()


def explain(scored: ScoredWeights, indices: list[int], predicted: list[int]) -> list[tuple[str, str]]:
    """(image, Grad-CAM overlay) as data URLs, for images of the split."""
    if not indices:
        return []
    from gtrain.data.loaders import normalize_uint8, uint8_normalization

    device = next(scored.model.parameters()).device
    pictures = [model_input(scored, i) for i in indices]
    batch = torch.stack(pictures).to(device)
    normalised = normalize_uint8(batch, *uint8_normalization(scored.meta.mean, scored.meta.std, device))
    scored.model.eval()
    heat = grad_cam(scored.model, normalised, torch.tensor(predicted, device=device)).cpu()
    return [(data_url(picture), data_url(overlay(picture, h))) for picture, h in zip(pictures, heat)]


# A perceptually ordered ramp (dark blue, purple, orange, yellow) for the heat map.
HEAT_STOPS = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float32)


def overlay(image: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) image and (H, W) heat in [0, 1] -> uint8 (3, H, W): the two blended."""
    rgb = image.expand(3, -1, -1).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    position = heat.numpy() * (len(HEAT_STOPS) - 1)
    low = np.floor(position).astype(int).clip(0, len(HEAT_STOPS) - 2)
    fraction = (position - low)[..., None]
    colour = HEAT_STOPS[low] * (1 - fraction) + HEAT_STOPS[low + 1] * fraction
    blended = 0.45 * rgb + 0.55 * colour
    return torch.from_numpy(blended.clip(0, 255).astype(np.uint8)).permute(2, 0, 1)


def data_url(image: torch.Tensor) -> str:
    """uint8 (C, H, W) -> an inline JPEG."""
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

e = html.escape  # every name and path comes from someone's folders: always escaped

STYLE = """
:root { --bg: #ffffff; --fg: #1d2330; --muted: #5b6475; --card: #f4f6fa; --line: #d5dae3;
        --a: #2563eb; --b: #d9480f; --heat: 37, 99, 235; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #12151c; --fg: #e6e9ef; --muted: #9aa3b5; --card: #1c212b; --line: #333b4a;
          --a: #6ea8ff; --b: #ff8a4c; --heat: 110, 168, 255; }
}
body { background: var(--bg); color: var(--fg); font: 14px/1.45 system-ui, sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid var(--line); }
.muted { color: var(--muted); } .card { background: var(--card); border-radius: 8px; padding: 12px; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; border-bottom: 1px solid var(--line); text-align: right; }
td.name, th.name { text-align: left; }
.matrix td { border: 1px solid var(--line); min-width: 22px; text-align: center; font-size: 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; } svg { background: var(--card); border-radius: 8px; }
svg text { fill: var(--muted); font-size: 11px; } svg .axis { stroke: var(--line); }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; background: var(--card); border-radius: 8px; padding: 8px; width: 240px; }
img { width: 112px; height: 112px; object-fit: contain; image-rendering: pixelated; margin: 2px; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
pre { background: var(--card); padding: 12px; border-radius: 8px; overflow: auto; font-size: 12px; }
.side { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 16px; }
"""


def render(runs: list[RunView], settings: ReportSettings) -> str:
    main = runs[0]
    title = f"{main.name}: {main.scored.meta.model} on {main.scored.info.name} ({settings.split})"
    tables = f"<div class=side><div>{confusion_section(main)}</div><div>{per_class_section(runs)}</div></div>"
    sections = [summary_section(runs, settings), curves_section(runs), tables, confused_pairs_section(main),
                gallery_section(main, settings.gallery), provenance_section(runs)]  # fmt: skip
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # Nothing from elsewhere, and no script: only inline styles and inline images.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        "<meta name=\"color-scheme\" content=\"light dark\">"
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{e(title)}</h1>" + "".join(sections) + "</body></html>\n"
    )


def summary_section(runs: list[RunView], settings: ReportSettings) -> str:
    rows = []
    for run in runs:
        r, status = run.scored.result, run.status
        rows.append(
            f"<tr><td class=name>{e(run.name)}</td><td class=name>{e(run.scored.meta.model)}</td><td>{r.images:,}</td>"
            f"<td>{r.top1:.2%}</td><td>{r.balanced_top1:.2%}</td><td>{r.top5:.2%}</td><td>{r.loss:.4f}</td>"
            f"<td>{e(str(status.get('epochs_done', '-')))}</td><td class=name>{e(str(status.get('status', '-')))}</td></tr>"
        )
    return (
        f"<h2>Evaluation on {e(settings.split)}</h2><table><tr><th class=name>run</th><th class=name>model</th>"
        "<th>images</th><th>top-1</th><th>balanced</th><th>top-5</th><th>loss</th><th>epochs</th>"
        "<th class=name>status</th></tr>" + "".join(rows) + "</table>"
    )


def curves_section(runs: list[RunView]) -> str:
    charts = []
    for title, keys, percent in (("loss", ("train_loss", "val_loss"), False), ("top-1", ("val_top1",), True),
                                 ("learning rate", ("lr",), False)):  # fmt: skip
        series = []
        for number, run in enumerate(runs):
            for key in keys:
                points = [(row["epoch"], row[key]) for row in run.metrics if isinstance(row.get(key), int | float)]
                label = f"{run.name} {key}" if len(runs) > 1 else key
                series.append((label, points, "var(--a)" if number == 0 else "var(--b)", "val" not in key and title == "loss"))
        charts.append(line_chart(title, series, percent))
    return "<h2>Per epoch</h2><div class=charts>" + "".join(charts) + "</div>"


def line_chart(title: str, series: list[tuple[str, list[tuple[float, float]], str, bool]], percent: bool) -> str:
    """An inline SVG line chart: each series (label, points, colour, dashed)."""
    width, height, left, bottom, right = 340, 210, 52, 28, 12
    top = 16 + 12 * len([s for s in series if s[1]])  # below the title and the legend
    points = [p for _, ps, _, _ in series for p in ps]
    if not points:
        return f"<svg width={width} height={height} role=img><text x=12 y=20>{e(title)}: nothing logged</text></svg>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    label = (lambda y: f"{y:.0%}") if percent else (lambda y: f"{y:.3g}")
    parts = [f"<svg width={width} height={height} viewBox='0 0 {width} {height}' role=img>",
             f"<text x={left} y=16>{e(title)}</text>",
             f"<line class=axis x1={left} y1={height - bottom} x2={width - right} y2={height - bottom} />",
             f"<line class=axis x1={left} y1={top} x2={left} y2={height - bottom} />",
             f"<text x=4 y={sy(y1) + 4:.1f}>{label(y1)}</text><text x=4 y={sy(y0) + 4:.1f}>{label(y0)}</text>",
             f"<text x={left} y={height - 8}>epoch {x0:g}</text>",
             f"<text x={width - right - 60} y={height - 8}>epoch {x1:g}</text>"]  # fmt: skip
    for number, (name, ps, colour, dashed) in enumerate(series):
        if not ps:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
        dash = " stroke-dasharray='5 4'" if dashed else ""
        parts.append(f"<polyline fill=none stroke='{colour}' stroke-width=2{dash} points='{path}' />")
        parts += [f"<circle cx={sx(x):.1f} cy={sy(y):.1f} r=2.5 fill='{colour}' />" for x, y in ps]
        # The legend in the title's row, right to left: it never covers a curve.
        parts.append(f"<text x={width - right} y={16 + 12 * number} text-anchor=end style='fill:{colour}'>{e(name)}</text>")
    return "".join(parts) + "</svg>"


def confusion_section(run: RunView) -> str:
    result, names = run.scored.result, run.scored.meta.class_names
    shown = list(range(len(names)))
    note = ""
    if len(names) > MAX_MATRIX_CLASSES:
        mistakes = [sum(row) - row[t] for t, row in enumerate(result.confusion)]
        shown = sorted(sorted(shown, key=lambda t: -mistakes[t])[:MAX_MATRIX_CLASSES])
        note = f"<p class=muted>The {MAX_MATRIX_CLASSES} of {len(names)} classes with the most mistakes.</p>"
    header = "".join(f"<th title='{e(names[p])}'>{p}</th>" for p in shown)
    rows = []
    for t in shown:
        total = max(1, result.class_total[t])
        cells = "".join(
            f"<td style='background: rgba(var(--heat), {result.confusion[t][p] / total:.3f})' "
            f"title='{e(names[t])} as {e(names[p])}: {result.confusion[t][p]}'>{result.confusion[t][p] or ''}</td>"
            for p in shown
        )
        rows.append(f"<tr><th class=name>{t} {e(names[t])}</th>{cells}</tr>")
    return (
        "<h2>Confusion matrix</h2><p class=muted>Rows: true class; columns: predicted class (numbered as the rows); "
        f"shade: the share of the row.</p>{note}<table class=matrix><tr><th></th>{header}</tr>" + "".join(rows) + "</table>"
    )


def per_class_section(runs: list[RunView]) -> str:
    main = runs[0]
    rows = main.scored.result.per_class(main.scored.meta.class_names)
    others = [{row["class"]: row for row in run.scored.result.per_class(run.scored.meta.class_names)} for run in runs[1:]]
    order = sorted(range(len(rows)), key=lambda k: (rows[k]["recall"] if rows[k]["recall"] is not None else 2, k))
    pct = lambda value: "-" if value is None else f"{value:.1%}"  # noqa: E731
    head = "".join(f"<th>{e(run.name)} recall</th>" for run in runs[1:])
    body = []
    for k in order:
        row = rows[k]
        extra = "".join(f"<td>{pct(other.get(row['class'], {}).get('recall'))}</td>" for other in others)
        body.append(f"<tr><td class=name>{e(row['class'])}</td><td>{row['images']}</td><td>{pct(row['precision'])}</td>"
                    f"<td>{pct(row['recall'])}</td><td>{pct(row['f1'])}</td>{extra}</tr>")  # fmt: skip
    return ("<h2>Per class, lowest recall first</h2><table><tr><th class=name>class</th><th>images</th>"
            f"<th>precision</th><th>recall</th><th>F1</th>{head}</tr>" + "".join(body) + "</table>")  # fmt: skip


def confused_pairs_section(run: RunView) -> str:
    scored = run.scored
    names, scores = scored.meta.class_names, scored.result.images_scored
    index_of = {name: k for k, name in enumerate(names)}
    blocks = []
    for pair in scored.result.most_confused(names, PAIRS):
        t, p = index_of[pair["true"]], index_of[pair["predicted"]]
        chosen = scores.examples(t, p, PAIR_EXAMPLES)
        images = "".join(f"<img src='{url}' alt='{e(pair['true'])} predicted as {e(pair['predicted'])}' width={THUMBNAIL_PX}>"
                         for url, _ in explain(scored, chosen, [p] * len(chosen)))  # fmt: skip
        blocks.append(f"<div class=card><b>{e(pair['true'])}</b> predicted as <b>{e(pair['predicted'])}</b>: "
                      f"{pair['images']} image{'' if pair['images'] == 1 else 's'}<br>{images}</div>")  # fmt: skip
    if not blocks:
        return "<h2>Most confused pairs</h2><p class=muted>No image is predicted as another class.</p>"
    return "<h2>Most confused pairs</h2><div class=side>" + "".join(blocks) + "</div>"


def gallery_section(run: RunView, count: int) -> str:
    scored = run.scored
    worst = worst_images(scored.result, scored.meta.class_names, scored.dataset, "", count)
    predicted = [int(scored.result.images_scored.predicted[row["index"]]) for row in worst]
    pictures = explain(scored, [row["index"] for row in worst], predicted)
    figures = []
    for row, (image, heat) in zip(worst, pictures):
        verdict = "right" if row["class"] == row["predicted"] else "wrong"
        figures.append(
            f"<figure data-image='{e(row['image'])}'><img src='{image}' alt='{e(row['image'])}' width={THUMBNAIL_PX}>"
            f"<img src='{heat}' alt='Grad-CAM of {e(row['image'])}' width={THUMBNAIL_PX}><figcaption>"
            f"true <b>{e(row['class'])}</b>, predicted <b>{e(row['predicted'])}</b> ({row['probability']:.1%}, "
            f"{verdict}); loss {row['loss']:.3f}<br><span class=muted>{e(row['image'])}</span></figcaption></figure>"
        )
    return (
        f"<h2>The {len(worst)} highest-loss images</h2><p class=muted>Each with where the model looked for the class it "
        "predicted (Grad-CAM of the last stage). `gtrain eval --worst N` lists the same images.</p>"
        "<div class=gallery>" + "".join(figures) + "</div>"
    )


def provenance_section(runs: list[RunView]) -> str:
    blocks = []
    for run in runs:
        facts = {"folder": str(run.folder), "weights": str(run.scored.weights), "started": run.status.get("started"),
                 "updated": run.status.get("updated"), "host": run.status.get("host"),
                 **run.status.get("provenance", {}), "scored on": f"{run.scored.settings.device} {run.scored.settings.precision}"}  # fmt: skip
        rows = "".join(f"<tr><td class=name>{e(str(key))}</td><td class=name>{e(str(value))}</td></tr>"
                       for key, value in facts.items() if value is not None)  # fmt: skip
        blocks.append(f"<div><h3>{e(run.name)}</h3><table>{rows}</table><details><summary>recipe.toml</summary>"
                      f"<pre>{e(run.recipe_text)}</pre></details></div>")  # fmt: skip
    return "<h2>Recipe and provenance</h2><div class=side>" + "".join(blocks) + "</div>"
