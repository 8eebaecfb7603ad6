"""`gtrain report`: a self-contained HTML page of a run, checked in a real headless browser,
its gallery the images `gtrain eval --worst` lists, Grad-CAM where the class is decided, and
names from folders shown as text."""

import json
import re
import shutil

import pytest
import torch

from tests.conftest import invoke, write_image_folder

HOSTILE = "<img src=x onerror=alert(1)>"  # a folder name, so a class name
TINY = ["quickstart", "--set", "model.stage_depths=[1, 1, 1]", "--set", "train.precision=fp32",
        "--set", "train.device=cpu", "--set", "train.epochs=2", "--set", "data.dataset=ImageFolder",
        "--set", "data.image_size=16", "--set", "data.batch_size=8", "--set", "data.workers=0"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two finished runs on JPEGs of 3 classes, one of them named like an HTML tag; the first
    wrote its report at the end of fit (log.report = true)."""
    base = tmp_path_factory.mktemp("report")
    root = write_image_folder(base / "jpegs", class_names=("cat", "dog", HOSTILE), size=40, suffix=".jpg",
                              images_per_class={"train": 8, "val": 6})  # fmt: skip
    runs = []
    for name, lr, report in (("first", 0.1, "true"), ("second", 0.02, "false")):
        out = base / name
        result = invoke("fit", *TINY, "--set", f"data.root={root}", "--set", f"optim.lr={lr}",
                        "--set", f"log.report={report}", "--out", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        runs.append(out)
    return runs


def chromium():
    found = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
    if found is None:
        pytest.skip("no Chromium here: apt-get install chromium (bash .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    return found, sync_playwright


def test_fit_with_log_report_writes_the_report_at_the_end(trained):
    page = (trained[0] / "report.html").read_text()
    assert "highest-loss images" in page and "Confusion matrix" in page


def test_the_report_opens_offline_in_a_browser_every_image_decoded_and_the_gallery_is_evals_worst(trained, tmp_path):
    executable, sync_playwright = chromium()
    out = tmp_path / "report.html"
    result = invoke("report", trained[0], "--out", out, "--gallery", 12, "--device", "cpu")
    assert result.exit_code == 0, result.output
    worst = json.loads(invoke("eval", trained[0], "--split", "val", "--worst", 12, "--json", "--device", "cpu").output)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        problems, requests, dialogs = [], [], []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(out.as_uri())
        decoded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        gallery = page.evaluate("Array.from(document.querySelectorAll('figure')).map(f => f.dataset.image)")
        headings = page.evaluate("Array.from(document.querySelectorAll('th, td')).map(c => c.textContent)")
        screenshot = page.screenshot(full_page=True)
        browser.close()
    assert problems == [] and dialogs == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []  # nothing from elsewhere
    assert len(decoded) >= 2 * 12 and all(decoded)  # each gallery image and its Grad-CAM, and the pairs
    assert gallery == [row["image"] for row in worst["worst_images"]]
    assert HOSTILE in headings  # the class name shown as text
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(screenshot) > 10_000


def test_a_class_named_like_a_tag_is_escaped_everywhere(trained):
    page = (trained[0] / "report.html").read_text()
    assert HOSTILE not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    # No script can run, whatever slips through: the page's policy allows none.
    assert "<script" not in page and "default-src 'none'" in page


def test_compare_shows_two_runs_side_by_side(trained, tmp_path):
    out = tmp_path / "both.html"
    result = invoke("report", trained[0], "--compare", trained[1], "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    page = out.read_text()
    summary = re.search(r"<h2>Evaluation on val</h2>(.*?)</table>", page, re.S).group(1)
    assert ">first<" in summary and ">second<" in summary
    assert "second recall" in page  # per-class recall of the second run beside the first's


def test_report_mistakes_are_one_line(trained, tmp_path):
    for args, says in (([trained[0], "--out", tmp_path / "report.txt"], "give a name ending in .html"),
                       ([tmp_path / "nowhere"], "nowhere")):  # fmt: skip
        result = invoke("report", *args, "--device", "cpu")
        assert result.exit_code == 2 and says in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_grad_cam_peaks_where_the_class_is_decided():
    """A model whose class "square" is a bright square in the bottom-right corner (the other
    class: the same noise without it) looks there: Grad-CAM of "square" peaks in that corner's
    quadrant on every image that has it."""
    from gtrain.models import create_model
    from gtrain.report import grad_cam

    torch.manual_seed(0)
    model = create_model("resnext29_2x16d", num_classes=2, in_chans=3, stage_depths=(1, 1, 1))

    def images(count):
        labels = torch.arange(count) % 2  # 1: "square"
        batch = torch.rand(count, 3, 16, 16) * 0.5
        batch[labels == 1, :, 11:15, 11:15] = 3.0
        return batch, labels

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(30):
        batch, labels = images(16)
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    batch, labels = images(16)
    assert (model(batch).argmax(1) == labels).all()
    squares = batch[labels == 1]
    heat = grad_cam(model, squares, torch.ones(len(squares), dtype=torch.int64))  # (8, 16, 16)
    assert (heat.flatten(1).max(dim=1).values == 1).all()  # normalised to its peak, not all zero
    peaks = heat.flatten(1).argmax(dim=1)
    rows, columns = peaks // 16, peaks % 16
    assert ((rows >= 8) & (columns >= 8)).all(), (rows.tolist(), columns.tolist())


@pytest.mark.parametrize("name", ["resnext29_2x16d", "hornet_cifar_nano_7x7"])
def test_grad_cam_takes_every_family_through_its_last_stage(name):
    from gtrain.models import create_model
    from gtrain.report import grad_cam

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=3).eval()
    heat = grad_cam(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert heat.shape == (2, 32, 32) and torch.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # the weights are not touched
