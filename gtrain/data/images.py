"""Image files: reading, decoding only as much as the crop needs, and EXIF orientation.

A JPEG's size is read from its header without decoding it (simplejpeg, which links
libjpeg-turbo 3), so the training crop's box can be drawn first; the file is then decoded
at the smallest DCT scale (1/8, 1/4, 1/2 or whole) that still leaves the box at least the
output size on both sides, and the box cut from that and resized. libjpeg-turbo also
scales by 3/8 and 5/8 to 7/8, but those cost as much as a whole decode or more (measured on
4032x3024 and 500x375 JPEGs), so they are not used. Evaluation does the same for its resize:
a scaled decode where the image is at least twice the resize target.

Everything the scaled path does not take (PNG, WebP, GIF, CMYK JPEGs, a JPEG libjpeg-turbo's
header reader refuses) is decoded whole by TorchCodec, then by Pillow as a last resort. A
file neither reads raises OSError naming it.

Every path applies the EXIF orientation, so a photo a phone stored sideways is trained,
evaluated and predicted upright.
"""

import io
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as _RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from gtrain.errors import error_line

EIGHTHS = (1, 2, 4, 8)  # the DCT scales used, in eighths of the stored size
_ORIENTATION_TAG = 0x0112
_SCALABLE_COLOURS = ("YCbCr", "Gray", "RGB")  # what libjpeg-turbo turns into RGB itself


class EncodedImage(NamedTuple):
    """An image file's bytes, undecoded, and its path (for the error if it does not decode).
    A numpy array, not a tensor: DataLoader workers pickle it into the batch, where a tensor
    would take a shared-memory file descriptor per image."""

    path: str
    data: np.ndarray  # uint8 (bytes,)


def read_encoded(path: str) -> EncodedImage:
    return EncodedImage(path, np.fromfile(path, dtype=np.uint8))


class Probe(NamedTuple):
    """What an image file's header says: its size as displayed (after the EXIF orientation),
    the orientation (1-8), and whether the scaled JPEG decoder takes it."""

    height: int
    width: int
    orientation: int
    scalable: bool

    @property
    def stored_size(self) -> tuple[int, int]:
        """(height, width) as the file stores the pixels, before the orientation turns them."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


def probe(image: EncodedImage) -> Probe:
    """What the header of a JPEG says, read without decoding it; any other file is not
    `scalable` (its size unknown until it is decoded whole)."""
    import simplejpeg

    data = image.data
    if data[:2].tobytes() == b"\xff\xd8":
        try:
            height, width, colours, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # damaged, or a JPEG the header reader refuses: the whole decode names it
        else:
            orientation = jpeg_orientation(data)
            if orientation >= 5:  # stored transposed
                height, width = width, height
            return Probe(height, width, orientation, colours in _SCALABLE_COLOURS)
    return Probe(0, 0, 1, False)


def jpeg_orientation(data: np.ndarray) -> int:
    """The EXIF orientation of a JPEG (1: as stored): its segments are walked up to the image
    data, and an EXIF one, if any, is read by Pillow's `Image.Exif` (without opening the
    image, which refuses very large ones)."""
    position, end = 2, len(data)
    while position + 4 <= end and data[position] == 0xFF:
        marker, length = int(data[position + 1]), int(data[position + 2]) << 8 | int(data[position + 3])
        if marker == 0xDA or length < 2:  # the image data starts: no EXIF before it
            break
        segment = data[position + 4 : position + 2 + length].tobytes()
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            return _orientation_of(segment)
        position += 2 + length
    return 1


def _orientation_of(exif_segment: bytes) -> int:
    try:
        exif = Image.Exif()
        exif.load(exif_segment)
        orientation = exif.get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001  damaged EXIF of any kind: the image as stored
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as displayed, from its stored pixels and EXIF orientation: the
    transposes Pillow's `ImageOps.exif_transpose` makes, as views."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)  # (C, H, W) -> (C, W, H): 5 is this alone; 6-8 add flips
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def decode(image: EncodedImage, found: Probe, *, fast: bool = False) -> torch.Tensor:
    """The image as uint8 (3, H, W), upright, whole (`fast`: see `decode_stored`)."""
    pixels = decode_stored(image, found, 8, fast=fast) if found.scalable else None
    if pixels is None:
        return decode_whole(image)
    stored = torch.from_numpy(pixels).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), a view
    return orient(stored, found.orientation)


def decode_upright(image: EncodedImage, found: Probe, eighths: int, *, fast: bool = False) -> Image.Image | None:
    """`decode_stored`, upright, as a Pillow image (whose resize takes a fractional box)."""
    pixels = decode_stored(image, found, eighths, fast=fast)
    if pixels is None:
        return None
    stored = torch.from_numpy(pixels).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), a view
    upright = orient(stored, found.orientation).permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return Image.fromarray(np.ascontiguousarray(upright.numpy()))  # a copy only for a turned photo


def scaled_origin(found: Probe, eighths: int) -> tuple[float, float]:
    """Where the image's top-left corner lies in `decode_upright`'s image, in its pixels.
    libjpeg-turbo's last row and column at a smaller scale reach past the image (they cover
    the encoder's padding); an orientation that flips an axis brings them to the start."""
    s = eighths / 8
    stored_h, stored_w = found.stored_size
    pad_h, pad_w = math.ceil(stored_h * s) - stored_h * s, math.ceil(stored_w * s) - stored_w * s
    pad_x, pad_y = (pad_h, pad_w) if found.orientation >= 5 else (pad_w, pad_h)  # displayed x is stored y
    return (pad_x if found.orientation in (2, 3, 6, 7) else 0.0), (pad_y if found.orientation in (3, 4, 7, 8) else 0.0)


def decode_stored(image: EncodedImage, found: Probe, eighths: int, *, fast: bool = False) -> np.ndarray | None:
    """A JPEG that `found` says is `scalable`, decoded at `eighths`/8 of its size (libjpeg-turbo
    rounds each side up: pixel i covers the stored pixels [8i/e, 8(i+1)/e)), as stored (H, W,
    3); None where the decoder refuses the file (the whole decode then says what is wrong).
    `fast`: libjpeg-turbo's fast integer inverse DCT and chroma upsampling, 23% less time on
    500x375 JPEGs for pixels about one level of 255 away (measured), as FFCV decodes; for
    training crops, not for evaluation."""
    import simplejpeg

    stored_h, stored_w = found.stored_size
    limits = {} if eighths == 8 else {"min_height": -(-stored_h * eighths // 8), "min_width": -(-stored_w * eighths // 8)}
    try:
        return simplejpeg.decode_jpeg(image.data, colorspace="RGB", fastdct=fast, fastupsample=fast, **limits)
    except ValueError:
        return None


def decode_whole(image: EncodedImage) -> torch.Tensor:
    """uint8 (3, H, W), upright, at full size: JPEG, PNG, WebP and GIF (its first frame)
    through TorchCodec, other formats through Pillow; a file neither reads raises OSError
    naming it."""
    from torchcodec.decoders import decode_image

    data, path = image.data, image.path
    if data.size == 0:
        raise OSError(f"cannot decode the image {path}: the file is empty")
    try:
        pixels = decode_image(torch.from_numpy(data), mode="RGB")  # uint8, 16-bit PNGs included
    except (RuntimeError, ValueError):
        return _pillow_decode(image)  # not a format TorchCodec decodes, or damaged: Pillow says which
    if pixels.dim() == 4:  # an animated GIF or WebP: its frames
        pixels = pixels[0]
    return pixels  # TorchCodec applies the EXIF orientation itself (tested for JPEG, PNG and WebP)


def _pillow_decode(image: EncodedImage) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(image.data.tobytes())) as opened:
            upright = ImageOps.exif_transpose(opened).convert("RGB")
            return F.pil_to_tensor(upright)
    except UnidentifiedImageError:
        raise OSError(f"cannot decode the image {image.path}: neither TorchCodec nor Pillow reads its format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot decode the image {image.path}: {error_line(error)}") from None


def as_upright_tensor(image: Any) -> torch.Tensor:
    """A uint8 (C, H, W) tensor as it is, or a PIL image turned by its EXIF orientation."""
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(ImageOps.exif_transpose(image))
    return image


_PILLOW = {InterpolationMode.BILINEAR: Image.Resampling.BILINEAR, InterpolationMode.BICUBIC: Image.Resampling.BICUBIC}


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), a view


def _scale_for(*sides: float, target: int, allowed: tuple[int, ...] = EIGHTHS) -> int:
    """The smallest scale, in eighths, that keeps every side at least `target`."""
    return next((e for e in allowed if min(sides) * e / 8 >= target), 8)


class DecodeCrop:
    """RandomResizedCrop of an image file (`EncodedImage`), decoding only the scale the box
    needs; also takes uint8 tensors and PIL images, which it crops as torchvision does.

    The box is torchvision's RandomResizedCrop's (`get_params`: the same distribution, drawn
    from torch's generator, which the sample's own stream seeds), on the image as displayed,
    decoded with libjpeg-turbo's fast inverse DCT and upsampling (`decode_stored`). `full`:
    decode every file whole and accurately (the reference the scaled decode is measured
    against, and what gtrain did before)."""

    def __init__(self, size: int, interpolation: InterpolationMode, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 full: bool = False):  # fmt: skip
        self.size, self.interpolation, self.scale, self.ratio, self.full = size, interpolation, scale, ratio, full

    def __call__(self, item: Any) -> torch.Tensor:
        return self.cropped(*self.decoded(item))

    def decoded(self, item: Any) -> tuple[Any, tuple[float, ...]]:
        """(the image, the box on it): a uint8 tensor and an integer (top, left, height,
        width), or, decoded at a smaller scale, a Pillow image and the box's fractional
        (left, top, right, bottom) on it, which Pillow's resize takes."""
        if isinstance(item, EncodedImage):
            found = probe(item)
            if found.scalable:
                top, left, height, width = self.box(found.height, found.width)
                eighths = 8 if self.full else _scale_for(height, width, target=self.size)
                if eighths == 8:
                    return decode(item, found, fast=not self.full), (top, left, height, width)
                scaled = decode_upright(item, found, eighths, fast=not self.full)
                if scaled is None:  # damaged: the whole decode names the file, or reads what it can
                    return decode_whole(item), (top, left, height, width)
                s, (x, y) = eighths / 8, scaled_origin(found, eighths)
                return scaled, (x + left * s, y + top * s, x + (left + width) * s, y + (top + height) * s)
            image = decode_whole(item)
        else:
            image = as_upright_tensor(item)
        return image, self.box(image.shape[-2], image.shape[-1])

    def cropped(self, image: Any, box: tuple[float, ...]) -> torch.Tensor:
        """The box resized to `size` x `size` with antialiasing: by torchvision on a tensor
        (what RandomResizedCrop does), by Pillow to the sub-pixel on a scaled decode."""
        if isinstance(image, Image.Image):
            return _tensor(image.resize((self.size, self.size), _PILLOW[self.interpolation], box=box))
        top, left, height, width = box
        return F.resized_crop(image, top, left, height, width, [self.size, self.size], self.interpolation, antialias=True)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) on a `height` x `width` image."""
        shape_only = torch.empty((1, height, width), dtype=torch.uint8, device="meta")
        return _RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value}, full={self.full})"


class DecodeResizeCrop:
    """Evaluation's geometry: resize the short side to `resize`, then take the centre
    `size` x `size`; from an image file (`EncodedImage`) decoded at 1/8, 1/4 or 1/2 scale
    where that still leaves the short side at least `resize`, or from a uint8 tensor or PIL
    image. The resized size is computed from the image's own size, so a scaled decode and a
    whole one are resized to the same shape."""

    def __init__(self, size: int, resize: int, interpolation: InterpolationMode, *, full: bool = False):
        self.size, self.resize, self.interpolation, self.full = size, resize, interpolation, full

    def __call__(self, item: Any) -> torch.Tensor:
        if isinstance(item, EncodedImage):
            found = probe(item)
            eighths = _scale_for(found.height, found.width, target=self.resize, allowed=EIGHTHS[:-1])
            if found.scalable and not self.full and eighths < 8:
                scaled = decode_upright(item, found, eighths)
                if scaled is not None:
                    # The whole image's extent at the decoded scale, to the sub-pixel.
                    s, (height, width) = eighths / 8, resized_size(found.height, found.width, self.resize)
                    x, y = scaled_origin(found, eighths)
                    resized = scaled.resize((width, height), _PILLOW[self.interpolation],
                                            box=(x, y, x + found.width * s, y + found.height * s))  # fmt: skip
                    return F.center_crop(_tensor(resized), [self.size, self.size])
            image = decode(item, found)
        else:
            image = as_upright_tensor(item)
        resized = F.resize(image, resized_size(*image.shape[-2:], self.resize), self.interpolation, antialias=True)
        return F.center_crop(resized, [self.size, self.size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize}, interpolation={self.interpolation.value})"


def resized_size(height: int, width: int, short: int) -> list[int]:
    """(height, width) with the short side `short` and the aspect kept, rounded down as
    torchvision's Resize(int) rounds the long side."""
    if height <= width:
        return [short, max(1, math.floor(short * width / height))]
    return [max(1, math.floor(short * height / width)), short]
