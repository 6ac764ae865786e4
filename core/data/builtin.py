"""Datasets that need no download: procedurally drawn shapes and crops of bundled photos.

`builtin:shapes` (textured backgrounds, random colours), `builtin:shapes_plain` (its easier
variant for the CPU demo) and `builtin:photos`.

All are random-access sources for `core.data`: every
item is a pure function of (split, index), rendered directly at the requested resolution,
so tiny CPU configs and tests get real, labelled, reproducible images with no network.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from visual_tokenizers.core.data.decoding import DataError

# Distinct seed namespaces keep train and test (and the two datasets) disjoint.
_SPLIT_IDS = {"train": 0, "test": 1}
_SPLIT_ALIASES = {"validation": "test", "val": "test", "eval": "test"}


def _split_id(name: str, split: str) -> tuple[str, int]:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in _SPLIT_IDS:
        raise DataError(
            f"builtin:{name} has no split {split!r}; valid splits: train, test "
            f"(aliases: {', '.join(sorted(_SPLIT_ALIASES))})."
        )
    return split, _SPLIT_IDS[split]


class _Generated:
    """What core.data expects of a source, beyond __len__/read: generated data never fails."""

    num_skipped = 0

    def load(self, index: int, draft: int | None = None) -> tuple[np.ndarray, int]:
        return self.read(index)  # Already at the requested size: `draft` is irrelevant.


# ----------------------------------------------------------------------------- shapes

SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross")
SHAPE_CLASSES = tuple(f"{k}_{style}" for k in SHAPE_KINDS for style in ("filled", "outline"))


def _unit_polygon(kind: str) -> np.ndarray:
    """Vertices of a shape with circumradius 1, centred on the origin."""
    if kind == "square":
        angles = np.arange(4) * (np.pi / 2) + np.pi / 4
        return np.stack([np.cos(angles), np.sin(angles)], -1)
    if kind == "triangle":
        angles = np.arange(3) * (2 * np.pi / 3) - np.pi / 2
        return np.stack([np.cos(angles), np.sin(angles)], -1)
    if kind == "star":
        angles = np.arange(10) * (np.pi / 5) - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)
    if kind == "cross":  # A plus sign with arms one third of the width.
        a, b = 1 / math.sqrt(1 + 9), 3 / math.sqrt(1 + 9)  # Corners lie on the unit circle.
        pts = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b)]
        pts += [(-x, -y) for x, y in pts]
        return np.asarray(pts)
    raise ValueError(kind)


_POLYGONS = {k: _unit_polygon(k) for k in SHAPE_KINDS if k != "circle"}


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """Smooth colour noise (a tiny random grid upsampled bicubically) plus faint grain.

    Returns the RGB image and its approximate mean colour. Integer maths throughout: float
    arrays would make 256x256 rendering several times slower.
    """
    cells = int(rng.integers(2, 6))
    base = rng.uniform(0, 255, 3)
    grid = np.clip(base + rng.uniform(-70, 70, (cells, cells, 3)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    grain = rng.integers(-8, 9, (size, size, 1), dtype=np.int16)
    noisy = np.clip(np.asarray(smooth, np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(noisy), grid.reshape(-1, 3).mean(0)


def _shape_mask(
    rng: np.random.Generator,
    kind: str,
    filled: bool,
    size: int,
    radii: tuple[float, float] = (0.18, 0.42),
    widths: tuple[float, float] = (0.15, 0.3),
    rotate: bool = True,
) -> Image.Image:
    """Anti-aliased coverage mask ('L'), drawn at 4x (2x when large) then box-filtered."""
    ss = 4 if size <= 128 else 2
    canvas = size * ss
    radius = rng.uniform(*radii) * canvas
    cx, cy = rng.uniform(radius, canvas - radius, 2)
    width = max(ss, int(round(radius * rng.uniform(*widths))))
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if filled:
            draw.ellipse(box, fill=255)
        else:
            draw.ellipse(box, outline=255, width=width)
    else:
        theta = rng.uniform(0, 2 * np.pi) if rotate else 0.0
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        pts = _POLYGONS[kind] @ rot.T * radius + (cx, cy)
        pts = [tuple(p) for p in pts]
        if filled:
            draw.polygon(pts, fill=255)
        else:
            draw.polygon(pts, outline=255, width=width)
    return mask.reduce(ss)


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, ...]:
    """A random colour, pushed away from the background mean so the shape stays visible."""
    colour = rng.uniform(0, 255, 3)
    if np.abs(colour - background_mean).sum() < 180:
        colour = np.where(background_mean > 127, background_mean - 150, background_mean + 150)
    return tuple(int(c) for c in np.clip(colour, 0, 255))


# `builtin:shapes_plain`: flat dark backgrounds, bright shapes from a small palette, larger,
# upright shapes with thicker outlines. With the 8x8-token tiny tokenizer (configs/demo.py)
# reconstructions keep their class 97-100 % of the time here, against 54 % on
# `builtin:shapes`, whose random colours and textures leave an 8-bit token no room for the
# outline; upright shapes need far fewer distinct edge tokens than rotated ones.
PLAIN_BACKGROUNDS = ((20, 20, 30), (40, 30, 90), (30, 80, 40), (90, 30, 30))
PLAIN_COLOURS = (
    (250, 250, 250),
    (250, 200, 40),
    (60, 220, 250),
    (250, 90, 200),
    (120, 250, 90),
    (250, 120, 60),
)
PLAIN_RADII, PLAIN_WIDTHS = (0.28, 0.45), (0.25, 0.35)


def _pick(rng: np.random.Generator, palette: tuple) -> tuple[int, ...]:
    return palette[int(rng.integers(len(palette)))]


def render_shape(
    rng: np.random.Generator, size: int, plain: bool = False
) -> tuple[np.ndarray, int]:
    """One labelled image: label = 2 * kind + (1 if outline else 0); `plain`: the
    `builtin:shapes_plain` look (flat background, palette colours, larger upright shapes)."""
    label = int(rng.integers(len(SHAPE_CLASSES)))
    kind, filled = SHAPE_KINDS[label // 2], label % 2 == 0
    if plain:
        background = Image.new("RGB", (size, size), _pick(rng, PLAIN_BACKGROUNDS))
        mask = _shape_mask(rng, kind, filled, size, PLAIN_RADII, PLAIN_WIDTHS, rotate=False)
        colour = _pick(rng, PLAIN_COLOURS)
    else:
        background, mean = _background(rng, size)
        mask = _shape_mask(rng, kind, filled, size)
        colour = _shape_colour(rng, mean)
    fill = Image.new("RGB", (size, size), colour)
    return np.asarray(Image.composite(fill, background, mask)), label


class ShapesSource(_Generated):
    """`builtin:shapes`: 10 classes (5 kinds x filled/outline) on textured backgrounds."""

    num_classes = len(SHAPE_CLASSES)
    class_names = SHAPE_CLASSES
    sizes = {"train": 50_000, "test": 10_000}
    plain = False

    def __init__(self, split: str, image_size: int):
        self.split, self._split_id = _split_id("shapes", split)
        self.image_size = image_size
        self.name = f"builtin:shapes:{self.split}"

    def __len__(self) -> int:
        return self.sizes[self.split]

    def read(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        rng = np.random.default_rng([0x5A4E, self._split_id, index])
        return render_shape(rng, self.image_size, plain=self.plain)


class PlainShapesSource(ShapesSource):
    """`builtin:shapes_plain`: the same 10 classes, larger and upright, on flat backgrounds, in
    palette colours: the demo's data (configs/demo.py), where a MaskGIT trained for minutes on a CPU
    can learn to draw them. Same sizes and splits as `builtin:shapes`."""

    plain = True

    def __init__(self, split: str, image_size: int):
        super().__init__(split, image_size)
        self.name = f"builtin:shapes_plain:{self.split}"


# ----------------------------------------------------------------------------- photos


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _skimage(name: str):
    def load() -> np.ndarray:
        import skimage.data  # Lazy: only `builtin:photos` needs scikit-image.

        return getattr(skimage.data, name)()

    return load


# Photographs bundled inside the scikit-image wheel (checked to load with the network off;
# the pooch-fetched ones such as `eagle` or `lily` are deliberately absent).
# Test photos are held out of training so reconstructions are measured on unseen images.
TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "camera",
    "moon",
    "brick",
    "grass",
    "gravel",
)
TEST_PHOTOS = ("chelsea", "coffee", "coins")
ALL_PHOTOS = TRAIN_PHOTOS + TEST_PHOTOS
_LOADERS = {name: _skimage(name) for name in ALL_PHOTOS if name != "motorcycle"}
_LOADERS["motorcycle"] = _motorcycle


@functools.cache
def load_photo(name: str) -> Image.Image:
    """The full photograph as an RGB PIL image (grayscale ones are replicated)."""
    array = np.asarray(_LOADERS[name]())
    if array.dtype != np.uint8:  # e.g. boolean or float images; none of ours today.
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


class PhotosSource(_Generated):
    """`builtin:photos`: random square crops at random scales of the bundled photographs.

    The label is the photo's position in ALL_PHOTOS, so it names the source photograph.
    """

    num_classes = len(ALL_PHOTOS)
    class_names = ALL_PHOTOS
    sizes = {"train": 10_000, "test": 1_000}
    min_crop_fraction = 0.2  # Smallest crop side, as a fraction of the photo's shorter side.

    def __init__(self, split: str, image_size: int):
        self.split, self._split_id = _split_id("photos", split)
        self.photos = TRAIN_PHOTOS if self.split == "train" else TEST_PHOTOS
        self.image_size = image_size
        self.name = f"builtin:photos:{self.split}"

    def __len__(self) -> int:
        return self.sizes[self.split]

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        return np.random.default_rng([0x9807, self._split_id, index])

    def photo_name(self, index: int) -> str:
        """Which photograph item `index` is cropped from."""
        return self.photos[int(self._rng(index).integers(len(self.photos)))]

    def read(self, index: int) -> tuple[np.ndarray, int]:
        rng = self._rng(index)
        name = self.photos[int(rng.integers(len(self.photos)))]
        photo = load_photo(name)
        short = min(photo.size)
        # Log-uniform scale: as many close-ups as wide views.
        side = short * math.exp(rng.uniform(math.log(self.min_crop_fraction), 0.0))
        x0 = rng.uniform(0, photo.width - side)
        y0 = rng.uniform(0, photo.height - side)
        crop = photo.resize(
            (self.image_size, self.image_size),
            Image.BICUBIC,
            box=(x0, y0, x0 + side, y0 + side),
            reducing_gap=2.0,  # Box-reduce large crops first: fast and alias-free.
        )
        return np.asarray(crop), ALL_PHOTOS.index(name)


BUILTINS = {"shapes": ShapesSource, "shapes_plain": PlainShapesSource, "photos": PhotosSource}
