"""Published weights by name, fetched once into PyTorch's hub cache ($TORCH_HOME/hub/checkpoints).

`model.pretrained` takes, besides a local file:

    torchvision:IMAGENET1K_V2          a member of the model's torchvision weights enum: its URL,
                                       the hash prefix in its file name, its published top-1
                                       and its preprocessing
    timm:a1h_in1k                      one of timm's pretrained tags for the model (timm's ResNet
                                       keys are torchvision's), from the Hugging Face hub through
                                       huggingface_hub's cache ($HF_HOME), with its licence
                                       (the `timm` extra)
    https://.../file.pth#sha256=HEX    any URL with the file's full SHA-256 (the HorNet release's
                                       weights publish none, and have moved host several times)

A file already in the cache loads without the network. A download goes to a temporary
file beside its place and is moved there only once its hash matches (torch.hub's own
downloader), so a failed or mismatched download leaves nothing behind.
"""

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gtrain.errors import UserError, error_line

TORCHVISION = "torchvision:"
TIMM = "timm:"
URL_SCHEMES = ("https://", "http://")
HUB_FILE = "model.safetensors"  # what timm publishes in each of its Hugging Face hub repositories


@dataclass(frozen=True)
class Preprocessing:
    """How the weights' own training and evaluation prepared an image."""

    crop_size: int  # px, the side the model saw
    resize_size: int  # px, the short side before the evaluation's centre crop
    interpolation: str  # "bilinear" or "bicubic"
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def describe(self) -> str:
        return f"crop {self.crop_size}, resize {self.resize_size}, {self.interpolation}"


@dataclass(frozen=True)
class PublishedWeights:
    name: str  # as model.pretrained writes it
    url: str
    sha256: str | None = None  # the whole digest, checked on download and on use
    hash_prefix: str | None = None  # torchvision's: the start of the digest, in the file's name
    top1: float | None = None  # published ImageNet-1k top-1, a fraction
    licence: str = "as published"
    preprocessing: Preprocessing | None = None
    hub_repo: str | None = None  # a Hugging Face hub repository (timm's), instead of a URL

    @property
    def non_commercial(self) -> bool:
        return "-nc" in self.licence.lower()

    @property
    def cached_file(self) -> Path:
        """Where the file is, or will be, cached."""
        if self.hub_repo is not None:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self.hub_repo, HUB_FILE, cache_dir=os.environ.get("HF_HUB_CACHE"))
            return Path(found) if isinstance(found, str) else Path(hub_cache_dir()) / self.hub_repo / HUB_FILE
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(self.url).path).name


def is_weights_name(text: str | None) -> bool:
    return bool(text) and text.startswith((TORCHVISION, TIMM, *URL_SCHEMES))


def published_weights(model_name: str) -> list[PublishedWeights]:
    """The named weights of `model_name`: torchvision's, and timm's where timm is installed."""
    import torchvision

    try:
        found = [_from_torchvision(weights) for weights in torchvision.models.get_model_weights(model_name)]
    except ValueError:  # a model torchvision does not have
        found = []
    return found + timm_weights(model_name)


def timm_weights(model_name: str) -> list[PublishedWeights]:
    try:
        import timm
    except ImportError:
        return []
    found = []
    for full_name in timm.list_pretrained(f"{model_name}.*"):
        config = timm.models.get_pretrained_cfg(full_name)
        if not config.hf_hub_id or config.num_classes is None:
            continue
        crop = config.input_size[-1]
        preprocessing = Preprocessing(crop_size=crop, resize_size=round(crop / config.crop_pct),
                                      interpolation=config.interpolation, mean=tuple(config.mean), std=tuple(config.std))  # fmt: skip
        found.append(PublishedWeights(
            name=TIMM + full_name.partition(".")[2], url=f"the Hugging Face hub repository {config.hf_hub_id}",
            licence=config.license or "as published", preprocessing=preprocessing, hub_repo=config.hf_hub_id,
        ))  # fmt: skip
    return found


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _from_torchvision(weights) -> PublishedWeights:
    transforms = weights.transforms()
    preprocessing = Preprocessing(
        crop_size=transforms.crop_size[0], resize_size=transforms.resize_size[0],
        interpolation=transforms.interpolation.value, mean=tuple(transforms.mean), std=tuple(transforms.std),
    )  # fmt: skip
    hash_prefix = Path(urlsplit(weights.url).path).stem.rsplit("-", 1)[-1]
    top1 = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return PublishedWeights(
        name=TORCHVISION + weights.name, url=weights.url, hash_prefix=hash_prefix,
        top1=None if top1 is None else top1 / 100, licence="bsd-3-clause",
        preprocessing=preprocessing,
    )  # fmt: skip


def resolve(name: str, model_name: str) -> PublishedWeights:
    """The weights `name` stands for, for `model_name`; one line for a name it has no weights under."""
    if name.startswith(URL_SCHEMES):
        url, _, fragment = name.partition("#")
        digest = fragment.removeprefix("sha256=").lower()
        if not fragment.startswith("sha256=") or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise UserError(
                f"model.pretrained = {name!r}: give the file's SHA-256 after the URL, as URL#sha256=<64 hex digits> "
                "(`sha256sum FILE` prints it), so that a changed or corrupt download is refused"
            )
        return PublishedWeights(name=name, url=url, sha256=digest)
    if name.startswith(TIMM):
        if importlib.util.find_spec("timm") is None:
            raise UserError(f"model.pretrained = {name!r} needs timm: pip install 'gtrain[timm]'")
    available = published_weights(model_name)
    if name == TORCHVISION + "DEFAULT" and any(w.name.startswith(TORCHVISION) for w in available):
        import torchvision

        name = TORCHVISION + torchvision.models.get_model_weights(model_name).DEFAULT.name
    for weights in available:
        if weights.name == name:
            return weights
    valid = ", ".join(weights.name for weights in available) or "none (neither torchvision nor timm has this model)"
    raise UserError(f"model.pretrained = {name!r}: {model_name} has no such weights; its published ones: {valid}")


def fetch(weights: PublishedWeights) -> Path:
    """The weights' file in the cache, downloaded first if it is not there."""
    if weights.hub_repo is not None:
        return _fetch_from_hub(weights)
    target = weights.cached_file
    if target.is_file():
        if weights.sha256 is not None and sha256_of(target) != weights.sha256:
            target.unlink()
            raise UserError(f"{target} is not the file {weights.name} names (another SHA-256): it was removed; run again to download it")
        return target
    import torch

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(target), hash_prefix=weights.sha256 or weights.hash_prefix,
                                       progress=False)  # fmt: skip
    except RuntimeError as error:  # torch.hub's hash check; it removed the download
        raise UserError(
            f"{weights.url}: the downloaded file's SHA-256 does not start with {weights.sha256 or weights.hash_prefix} "
            f"({error_line(error)}); nothing was kept: check the URL and the checksum"
        ) from None
    except OSError as error:  # no network, a refused connection, an HTTP error, a full disk
        raise UserError(
            f"cannot download {weights.name} ({error_line(error)}): without a network, put the file from {weights.url} "
            f"at {target}"
        ) from None
    return target


def _fetch_from_hub(weights: PublishedWeights) -> Path:
    from huggingface_hub import hf_hub_download

    cached = weights.cached_file
    if cached.is_file():
        return cached
    try:
        return Path(hf_hub_download(weights.hub_repo, HUB_FILE, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception as error:  # huggingface_hub's own errors for no network, a missing repository, a full disk
        raise UserError(
            f"cannot download {weights.name} from {weights.hub_repo} ({error_line(error, with_type=True)}): without a "
            f"network, run `gtrain weights fetch {weights.name} --model MODEL` where there is one and copy {hub_cache_dir()}"
        ) from None


def local_file(pretrained: str, model_name: str) -> Path:
    """The file `model.pretrained` names: a weights name's cached file, fetched if needed, or the path itself."""
    if is_weights_name(pretrained):
        return fetch(resolve(pretrained, model_name))
    return Path(pretrained)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def with_weights_preprocessing(recipe):
    """`recipe` with the named weights' own preprocessing where its [data] leaves it unset
    (an ImageFolder's train size, evaluation resize and crop, interpolation), and a line
    saying what was taken; (recipe, None) when there is nothing to take."""
    pretrained = recipe.model.pretrained
    if not pretrained or not pretrained.startswith((TORCHVISION, TIMM)) or recipe.data.dataset != "ImageFolder":
        return recipe, None
    preprocessing = resolve(pretrained, recipe.model.name).preprocessing
    given = recipe.data.model_fields_set
    wanted = {"image_size": preprocessing.crop_size, "eval_image_size": preprocessing.crop_size,
              "eval_resize_size": preprocessing.resize_size, "interpolation": preprocessing.interpolation}  # fmt: skip
    taken = {key: value for key, value in wanted.items() if key not in given and getattr(recipe.data, key) != value}
    if not taken:
        return recipe, None
    data = recipe.data.model_copy(update=taken)
    settings = ", ".join(f"data.{key} = {value!r}" for key, value in taken.items())
    return recipe.model_copy(update={"data": data}), f"{settings}, from {pretrained}"


def weights_table() -> list[dict]:
    """Every model's named weights: `gtrain models --weights`."""
    from gtrain.models import list_models

    return [
        {"model": model, "name": weights.name, "top1": weights.top1, "licence": weights.licence,
         "cached": weights.cached_file.is_file(), "file": str(weights.cached_file)}
        for model in list_models() for weights in published_weights(model)
    ]  # fmt: skip


def licence_line(pretrained: str | None, model_name: str) -> str | None:
    """A line for weights whose licence forbids commercial use (timm's fb_* weights are CC-BY-NC 4.0)."""
    if not is_weights_name(pretrained) or pretrained.startswith(URL_SCHEMES):
        return None
    weights = resolve(pretrained, model_name)
    return f"{weights.licence}: {weights.name} is for non-commercial use only" if weights.non_commercial else None
