"""Image files: the training crop's box, the scaled decode against a whole one, the formats
the decoders take, damaged files, and EXIF orientation on every path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.functional import pil_to_tensor

from tests.conftest import invoke
from gtrain.data.images import DecodeCrop, DecodeResizeCrop, EncodedImage, _scale_for, decode, decode_whole, probe

BILINEAR, BICUBIC = InterpolationMode.BILINEAR, InterpolationMode.BICUBIC


def photo(name: str = "china.jpg", size: tuple[int, int] = (1024, 768)) -> Image.Image:
    """One of scikit-learn's sample photos at `size` (width, height), with sensor-like noise."""
    image = Image.fromarray(load_sample_image(name)).resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str = "JPEG", **save) -> EncodedImage:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return EncodedImage(f"photo.{fmt.lower()}", np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy())


def with_orientation(image: Image.Image, orientation: int) -> EncodedImage:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("interpolation", [BILINEAR, BICUBIC])
def test_a_whole_decode_crops_exactly_as_torchvisions_random_resized_crop(interpolation):
    """The same box from the same seed, and the same resize: DecodeCrop on the file equals
    transforms.v2.RandomResizedCrop on the decoded image, to the bit."""
    file = encoded(photo(size=(400, 300)))
    theirs = v2.RandomResizedCrop(64, interpolation=interpolation, antialias=True)
    ours = DecodeCrop(64, interpolation, full=True)
    image = decode_whole(file)
    for seed in range(30):
        torch.manual_seed(seed)
        expected = theirs(image)
        torch.manual_seed(seed)
        assert torch.equal(ours(file), expected), seed
    torch.manual_seed(0)  # tensors and PIL images take the same crop as files
    from_tensor = ours(image)
    torch.manual_seed(0)
    assert torch.equal(from_tensor, theirs(image))


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_the_scaled_decode_stays_within_its_measured_bound_of_a_whole_decode(name):
    """Decoding at 1/8, 1/4 or 1/2 scale in the DCT, then cropping the same box to the
    sub-pixel, against decoding whole and cropping: the DCT's downscale is another filter
    than the resize's antialiasing, so pixels differ by a few levels in fine detail. Measured
    on 2016x1512 versions of these photos, 40 crops each, training's fast inverse DCT
    included: mean 0.67-1.16 levels of 255, the worst crop's mean 2.7, bilinear or bicubic.
    Bound here: 1.5 overall, 4 for any crop. Evaluation's resize: mean 0.5-1.1 levels."""
    file = encoded(photo(name, (2016, 1512)), quality=90)
    scaled, whole = DecodeCrop(224, BICUBIC), DecodeCrop(224, BICUBIC, full=True)
    differences, scales = [], set()
    for seed in range(20):
        torch.manual_seed(seed)
        _, _, height, width = scaled.box(1512, 2016)
        scales.add(_scale_for(height, width, target=224))
        torch.manual_seed(seed)
        a = scaled(file)
        torch.manual_seed(seed)
        differences.append((a.float() - whole(file).float()).abs().mean().item())
    assert len(scales) >= 2 and 8 not in scales  # 1/4 and 1/2 at least
    assert np.mean(differences) < 1.5 and max(differences) < 4, differences
    evaluate = (DecodeResizeCrop(224, 256, BICUBIC)(file).float() - DecodeResizeCrop(224, 256, BICUBIC, full=True)(file).float())
    assert evaluate.abs().mean() < 1.5


def test_evaluation_decodes_at_a_smaller_scale_only_from_twice_the_resize():
    from gtrain.data import images

    calls = []
    real = images.decode_stored

    def spy(image, found, eighths, **options):
        calls.append(eighths)
        return real(image, found, eighths, **options)

    images.decode_stored = spy
    try:
        evaluate = DecodeResizeCrop(56, 64, BILINEAR)
        for size in [(120, 90), (128, 128), (300, 256), (1024, 768)]:
            assert evaluate(encoded(photo(size=size))).shape == (3, 56, 56)
    finally:
        images.decode_stored = real
    assert calls == [8, 4, 2, 1]  # 90 < 2 x 64: whole; 128: 1/2; 256: 1/4; 768 / 8 = 96 >= 64: 1/8


def _formats() -> dict[str, tuple[EncodedImage, Image.Image]]:
    """Files of every kind the full decoder takes, and what Pillow makes of each (RGB)."""
    base = photo("flower.jpg", (96, 64))
    cases = {
        "png": (base, "PNG", {}), "png 16-bit grey": (base.convert("I;16"), "PNG", {}),
        "png with alpha": (base.convert("RGBA"), "PNG", {}), "png palette": (base.convert("P"), "PNG", {}),
        "webp": (base, "WEBP", {"lossless": True}), "gif": (base.convert("P"), "GIF", {}),
        "grey jpeg": (base.convert("L"), "JPEG", {}), "cmyk jpeg": (base.convert("CMYK"), "JPEG", {}),
        "progressive jpeg": (base, "JPEG", {"progressive": True}), "bmp": (base, "BMP", {}),
    }  # fmt: skip
    files = {}
    for name, (image, fmt, save) in cases.items():
        file = encoded(image, fmt, **save)
        with Image.open(io.BytesIO(file.data.tobytes())) as opened:
            files[name] = (file, opened.convert("RGB") if opened.mode != "I;16" else opened.point(lambda v: v / 257).convert("RGB"))
    return files


@pytest.mark.parametrize("kind", list(_formats()))
def test_every_format_decodes_to_what_pillow_reads(kind):
    file, expected = _formats()[kind]
    found = probe(file)
    image = decode(file, found)
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
    difference = (image.int() - pil_to_tensor(expected).int()).abs()
    assert difference.max() <= 1, (kind, difference.max())  # 16-bit to 8-bit rounding may differ by one level
    assert found.scalable == (kind in ("grey jpeg", "progressive jpeg"))  # CMYK goes to the full decoder


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty", "text"])
def test_a_damaged_file_raises_one_error_naming_it(damage):
    data = encoded(photo(size=(256, 192))).data
    damaged = {"truncated": data[: len(data) // 3], "corrupt": np.concatenate([data[:200], np.full(500, 7, np.uint8)]),
               "empty": data[:0], "text": np.frombuffer(b"not an image at all", dtype=np.uint8)}[damage]  # fmt: skip
    file = EncodedImage("holiday/IMG_0042.jpg", damaged.copy())
    for transform in (DecodeCrop(64, BILINEAR), DecodeResizeCrop(64, 73, BILINEAR)):
        with pytest.raises(OSError, match=r"cannot decode the image holiday/IMG_0042\.jpg: \S") as error:
            transform(file)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_image_as_pillow_does(orientation):
    """The stored pixels turned as Pillow's `ImageOps.exif_transpose` turns them, decoded
    whole or at a smaller scale, for training (the crop) and evaluation (resize and crop)."""
    stored = photo(size=(320, 240))
    file = with_orientation(stored, orientation)
    with Image.open(io.BytesIO(file.data.tobytes())) as opened:
        upright = ImageOps.exif_transpose(opened)
        upright.load()
    found = probe(file)
    assert (found.width, found.height) == upright.size and found.orientation == orientation
    assert torch.equal(decode(file, found), pil_to_tensor(upright))
    assert torch.equal(decode_whole(file), pil_to_tensor(upright))
    evaluate = DecodeResizeCrop(48, 56, BILINEAR)  # 240 >= 2 x 56: a quarter-scale decode
    assert (evaluate(file).float() - evaluate(pil_to_tensor(upright)).float()).abs().mean() < 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_scaled_decode_of_a_turned_photo_keeps_its_geometry_at_any_size(orientation):
    """At 1/8 scale libjpeg-turbo's last row and column cover the encoder's padding (1001 and
    761 are not multiples of 8); a turn that flips an axis brings them to the start. The
    scaled crops and resizes stay as close to the whole decode's as without a turn
    (measured: a mean of 1.9 levels for every orientation; 5-11 if the padding is ignored)."""
    file = with_orientation(photo(size=(1001, 761)), orientation)
    evaluate, whole = DecodeResizeCrop(64, 80, BILINEAR), DecodeResizeCrop(64, 80, BILINEAR, full=True)
    assert (evaluate(file).float() - whole(file).float()).abs().mean() < 2.5
    crop, crop_whole = DecodeCrop(64, BILINEAR), DecodeCrop(64, BILINEAR, full=True)
    differences = []
    for seed in range(8):
        torch.manual_seed(seed)
        scaled = crop(file)
        torch.manual_seed(seed)
        differences.append((scaled.float() - crop_whole(file).float()).abs().mean().item())
    assert np.mean(differences) < 2.5, differences


def test_the_orientation_is_found_behind_large_segments():
    """EXIF after 130 KB of comments (cameras put large maker notes and previews first)."""
    data = with_orientation(photo(size=(64, 48)), 6).data.tobytes()
    comment = b"\xff\xfe" + (65000).to_bytes(2, "big") + bytes(64998)
    file = EncodedImage("photo.jpg", np.frombuffer(data[:2] + comment * 2 + data[2:], dtype=np.uint8).copy())
    found = probe(file)
    assert (found.orientation, found.width, found.height) == (6, 48, 64)
    assert torch.equal(decode(file, found), decode_whole(file))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_of_other_formats(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6
    file = encoded(photo(size=(64, 48)), fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(io.BytesIO(file.data.tobytes())) as opened:
        upright = pil_to_tensor(ImageOps.exif_transpose(opened).convert("RGB"))
    assert upright.shape == (3, 64, 48) and torch.equal(decode_whole(file), upright)


def test_a_photo_stored_sideways_is_predicted_like_the_same_photo_turned_by_hand(tmp_path):
    """A phone's JPEG stored sideways with EXIF orientation 6, and its pixels turned upright
    by hand and saved losslessly: `gtrain predict` and `Classifier` (on the path and on the
    PIL image) see the upright photo."""
    import json

    from tests.conftest import write_image_folder
    from gtrain.predict import Classifier

    root = write_image_folder(tmp_path / "data", size=32)
    run = tmp_path / "run"
    result = invoke("fit", "quickstart", "--set", "data.dataset=ImageFolder", "--set", f"data.root={root}",
                    "--set", "data.image_size=32", "--set", "train.epochs=1", "--set", "train.precision=fp32",
                    "--set", "data.workers=0", "--set", "data.batch_size=16", "--out", run, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    stored = photo(size=(80, 56))  # under twice the resize (36): decoded whole, as the PNG is
    sideways = tmp_path / "sideways.jpg"
    sideways.write_bytes(with_orientation(stored, 6).data.tobytes())
    with Image.open(sideways) as opened:
        turned = opened.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 asks for
    by_hand = tmp_path / "by_hand.png"
    turned.save(by_hand)
    classifier = Classifier.load(run, device="cpu")
    expected = classifier.probabilities(torch.stack([classifier.preprocess(by_hand)]))
    stored_as_is = classifier.probabilities(torch.stack([classifier.preprocess(stored)]))
    assert not torch.allclose(expected, stored_as_is)  # the turn matters to this model
    for image in (sideways, Image.open(sideways)):
        assert torch.equal(classifier.probabilities(torch.stack([classifier.preprocess(image)])), expected)
    result = invoke("predict", run, sideways, by_hand, "--json", "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line)["predictions"] for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and rows[0] == rows[1], rows
