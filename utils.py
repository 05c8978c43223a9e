"""The ground floor, which imports nothing of the project: image I/O at the edges, atomic writes, seeds, devices,
prompts and user errors.

Inside the project images are `N x 3 x H x W` float tensors in `[-1, 1]`; this module converts from and to files.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import warnings
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif")
HEIF_EXTENSIONS = (".heic", ".heif")
MIN_SIDE = 64
#: The largest photo accepted, in pixels (today's phones take up to 200 megapixels); larger files are refused
#: before they are decoded. It replaces Pillow's decompression-bomb limit (89 megapixels) for this project's reads.
MAX_PIXELS = 250_000_000
_UMASK = os.umask(0)
os.umask(_UMASK)

#: The 25 editing instructions of the FaceLock paper's code, verbatim (typos included: they drive the metrics).
PAPER_PROMPTS = (
    "Turn the person's hair pink",
    "Let the person turn bald",
    "Let the person have a tatto",
    "Let the person wear purple makeup",
    "Let the person grow a mustach",
    "Turn the person into a zombie",
    "Change the skin color to Avatar blue",
    "Add elf-like ears",
    "Add large vampire fangs",
    "Apply Goth style makeup",
    "Let the person wear a police suit",
    "Let the person wear a bowtie",
    "Let the person wear a helmet",
    "Let the person wear sunglasses",
    "Let the person wear earrings",
    "Let the person smoke a cigar",
    "Place a headband in the hair",
    "Place a tiara on the top of the head",
    "Let it be snowy",
    "Change the background to a beach",
    "Add a city skyline background",
    "Add a forest background",
    "Change the background to a desert",
    "Set the background in a library",
    "Let the person stand under the moon",
)


def read_prompts(path: str | Path | None) -> list[str]:
    """The paper's prompts, or one prompt per non-empty line of `path`."""
    if path is None:
        return list(PAPER_PROMPTS)
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read prompts from {path}: {error}") from None
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts


class UserError(Exception):
    """A problem the user can fix; scripts print its one-line message and exit with status 2."""


class InputError(UserError):
    """An input file that cannot be used."""


class ModelUnavailable(UserError):
    """A model that cannot be loaded (offline, wrong path)."""


def run_script(main: Callable[[], int]) -> None:
    """Run a script's `main`, turning a `UserError` into one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # onnx2torch's converted Slice indexes with a list on every call; torch warns each time, which floods the output
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    for noisy in ("httpx", "httpcore", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept and a rerun resumes", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------- images

def load_image(path: str | Path) -> Image.Image:
    """Open an image file (PNG, JPEG, WebP, BMP, TIFF, HEIC/HEIF, ...) as 8-bit RGB with its EXIF orientation
    applied.

    Grayscale and palette images become RGB, transparency is composited onto white, 16-bit and float images are
    scaled to 8 bits. Raises `InputError` for a missing, unreadable, truncated, too small or too large file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow then refuses (warns, made an error here) beyond this project's limit
    if not read_heif() and path.suffix.lower() in HEIF_EXTENSIONS:
        raise InputError(f"{path}: HEIC/HEIF photos need the pillow-heif package (pip install -r requirements.txt)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                ImageOps.exif_transpose(opened, in_place=True)  # in place: a huge photo is not copied
                image = opened
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path}: image too large (over {MAX_PIXELS / 1e6:.0f} megapixels)") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: unreadable or truncated image ({error})") from None
    if min(image.size) < MIN_SIDE:
        raise InputError(f"{path}: image too small ({image.width}x{image.height}); need at least {MIN_SIDE} px a side")
    return to_rgb8(image)


@functools.cache
def read_heif() -> bool:
    """Teach Pillow to open HEIC/HEIF photos (what phones take) with pillow-heif, once, when the first image is
    opened; False where pillow-heif is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def to_rgb8(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (itself, not a copy, where it already is)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            peak = 1.0
        image = Image.fromarray(np.clip(array / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image to a `1 x 3 x H x W` float32 tensor in `[-1, 1]`."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """`3 x H x W` or `1 x 3 x H x W` tensor in `[-1, 1]` to an `H x W x 3` uint8 array (rounded)."""
    x = x.detach().float().cpu().reshape(-1, *x.shape[-2:])
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def linf_255(a: np.ndarray, b: np.ndarray) -> int:
    """L-infinity distance between two uint8 images, in 1/255 units."""
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def batches_by_size(items: list, size_of: Callable[[Any], Any], batch_size: int) -> Iterator[list]:
    """Consecutive batches of at most `batch_size` items of the same size (by name order within a size)."""
    ordered = sorted(items, key=size_of)  # stable
    for _, group in groupby(ordered, key=size_of):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def image_size(path: str | Path) -> tuple[int, int]:
    """The (width, height) `load_image` will give, read from the file's header alone (EXIF orientation applied);
    (0, 0) for a file that cannot be opened, which `load_image` then explains."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    read_heif()
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
            return image.size[::-1] if turned else image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return (0, 0)


def loaded_batches(items: list, path_of: Callable[[Any], Path], batch_size: int,
                   fail: Callable[[Any, InputError], None]) -> Iterator[list[tuple[Any, Image.Image]]]:
    """`(item, image)` batches of at most `batch_size` same-size images, each batch loaded only when it is reached,
    so memory does not grow with the folder. An item whose image cannot be loaded goes to `fail(item, error)`."""
    sizes = {path_of(item): image_size(path_of(item)) for item in items}
    for batch in batches_by_size(items, lambda item: sizes[path_of(item)], batch_size):
        loaded = []
        for item in batch:
            try:
                loaded.append((item, load_image(path_of(item))))
            except InputError as error:
                fail(item, error)
        yield from batches_by_size(loaded, lambda pair: pair[1].size, batch_size)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; other files are ignored."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------- writing

#: How the temporary files of `atomic_write` begin and end (`.facelock-<name>.<random>.tmp`), so that a later run
#: removes only its own leftovers.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".facelock-", ".tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then move it into place in one step, so a reader
    (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # the mode of a file written normally, not mkstemp's owner-only one
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: zlib level of the PNGs written: 1 writes a perturbed photo about 3 times faster than Pillow's default 6, for files
#: about 13 % larger (`python -m evaluation.benchmarks.speed --sections png` measures it).
PNG_LEVEL = 1


def save_png(array: np.ndarray, path: str | Path, level: int = PNG_LEVEL) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array, "RGB").save(tmp, format="PNG", compress_level=level))


def write_json(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


def write_csv(rows: Sequence[dict], path: str | Path, fieldnames: Sequence[str] | None = None) -> None:
    """Dict rows as CSV, written atomically; the columns are `fieldnames`, or every key in order of appearance."""
    columns = list(fieldnames) if fieldnames else list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def png_output(source: Path, output_path: str | None, default_name: str, why: str) -> Path:
    """Where a script writes its result for `source`: `output_path`, or `default_name` beside the source. It must
    be a PNG (`why` says why) and must not be the source itself."""
    output = Path(output_path) if output_path else source.with_name(default_name)
    if output.suffix.lower() != ".png":
        raise UserError(f"{output}: {why}; use a .png path")
    if same_file(source, output):
        raise UserError(f"{output} is the input; choose another --output_path")
    return output


# --------------------------------------------------------------------------------------- seeds, devices

def derive_seed(*parts: Any) -> int:
    """A 63-bit seed determined by `parts` (e.g. run seed, prompt index, image name), independent of the order
    in which work is done or split between processes."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator, so that a CPU and a GPU run draw the same random numbers."""
    return torch.Generator("cpu").manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Model dtype: `auto` is float16 on CUDA (as the official code) and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
