"""A synthetic world of flat shapes with exact ground truth, for training the embedded model and benchmarking edits.

The world is fixed so that every tool and test agrees on it:

- canvases: 128x128 plus the multi-aspect buckets 256x128 and 128x256 (`width x height`);
- flat backgrounds white / black / gray / beige; one (75% of scenes) or two non-overlapping, anti-aliased objects;
- shapes circle / square / triangle / star; colours red / green / blue / yellow / purple / orange;
  sizes small / large (circumradius 24 / 38 px, named in the caption only when asked);
- captions ``a {size} {colour} {shape} on a {background} background``, objects listed left to right and
  joined with ``and``.

Patterns (striped / dotted, ``a red striped circle``) can still be rendered, edited and read back, but random scenes
have none: a stripe period of 8 px is one latent pixel of a factor-8 VAE, too fine for a small model to draw, and
the embedded model is trained without them (`EDIT_KINDS` therefore leaves pattern edits out).
Objects are big on purpose: a large object spans about five 16-px transformer tokens at patch size 2.

`generate_scene(seed)` is deterministic per seed. `apply_edit(scene, edit)` renders the ground-truth edited scene
with everything else identical. `oracle(image)` reads colour, shape, pattern, size and background back from pixels,
using only the palette and the shapes' geometry (numpy + Pillow, no learned model).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 205, 165),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
PATTERNS = ("striped", "dotted")
#: Canvas buckets as (width, height): the 1:1 base and the 2:1 / 1:2 multi-aspect analogues of 2048x1024.
CANVAS_SIZES = ((128, 128), (256, 128), (128, 256))
#: The edit kinds of the benchmark; `apply_edit` also renders "pattern" edits.
EDIT_KINDS = ("colour", "shape", "size", "background")
ALL_EDIT_KINDS = EDIT_KINDS + ("pattern",)

#: Circumradius in pixels of each size; every shape fits in the circle of this radius around its centre.
SIZE_RADIUS = {"small": 24.0, "large": 38.0}
#: Pattern ink: the object's colour times this factor (stripes / dots are a darker shade of the object).
SHADE = 0.5
STRIPE_PERIOD, STRIPE_WIDTH = 8.0, 3.0  # horizontal stripes, pixels
DOT_SPACING, DOT_RADIUS = 8.0, 2.0  # square grid of dots, pixels
#: Free pixels kept between the circumcircles of two objects, and between an object and the canvas border.
GAP, BORDER = 6.0, 2.0
SUPERSAMPLE = 4

# Each shape's outline in units of the circumradius r, centred on the object's centre, y pointing down.
_STAR_INNER = 0.45


def _outline(shape: str) -> np.ndarray | None:
    """Polygon vertices (k, 2) in units of r, or None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.7
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_CIRCLE_RADIUS = 0.85  # the circle's radius in units of r


def _extent(shape: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the shape's bounding box in units of r, relative to its centre."""
    poly = _outline(shape)
    if poly is None:
        return (-_CIRCLE_RADIUS, -_CIRCLE_RADIUS, _CIRCLE_RADIUS, _CIRCLE_RADIUS)
    return (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max())


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and its centre in pixels (x to the right, y down)."""

    shape: str
    colour: str
    size: str
    pattern: str | None
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]

    def phrase(self, mention_size: bool) -> str:
        words = [self.size] if mention_size else []
        words.append(self.colour)
        if self.pattern:
            words.append(self.pattern)
        words.append(self.shape)
        return " ".join(words)


def caption_for(objects: Sequence[SceneObject], background: str, mention_size: bool = False) -> str:
    """`a {size} {colour} {pattern} {shape} [and a ...] on a {background} background`, objects left to right."""
    ordered = sorted(objects, key=lambda o: o.cx)
    listed = " and ".join(f"a {o.phrase(mention_size)}" for o in ordered)
    return f"{listed} on a {background} background"


@dataclass
class Scene:
    """A rendered scene. `image` is (H, W, 3) uint8; `alphas` (n, H, W) float32 is each object's coverage in [0, 1].

    Objects are stored left to right (by centre x), in caption order; `masks` are the pixels an object touches.
    """

    image: np.ndarray
    caption: str
    objects: tuple[SceneObject, ...]
    background: str
    alphas: np.ndarray
    mention_size: bool = False
    seed: int | None = None

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def masks(self) -> np.ndarray:
        """(n, H, W) bool: pixels each object covers at all (anti-aliased edges included)."""
        return self.alphas > 0

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


# ----------------------------------------------------------------------------------------------------- rendering
def _coverage(
    shape: str, cx: float, cy: float, r: float, width: int, height: int
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A shape's box (x0, y0, x1, y1) in pixels and its supersampled inside-mask (S*h, S*w) bool there."""
    s = SUPERSAMPLE
    x0, y0 = max(int(np.floor(cx - r)) - 1, 0), max(int(np.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(np.ceil(cx + r)) + 2, width), min(int(np.ceil(cy + r)) + 2, height)
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    # Supersampled pixel (i, j) has its centre at ((j + 0.5) / s, (i + 0.5) / s) in box pixels; PIL fills the pixels
    # whose integer coordinates lie inside, so shift the outline by -0.5 sub-pixel.
    ccx, ccy = (cx - x0) * s - 0.5, (cy - y0) * s - 0.5
    poly = _outline(shape)
    if poly is None:
        rad = _CIRCLE_RADIUS * r * s
        draw.ellipse([ccx - rad, ccy - rad, ccx + rad, ccy + rad], fill=255)
    else:
        draw.polygon([(ccx + px * r * s, ccy + py * r * s) for px, py in poly], fill=255)
    return (x0, y0, x1, y1), np.asarray(canvas) > 127


def _ink(obj: SceneObject, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """Supersampled (S*h, S*w) bool: where the pattern's darker ink is, in the object's own frame."""
    if obj.pattern is None:
        return np.zeros(shape, dtype=bool)
    s = SUPERSAMPLE
    x0, y0 = box[0], box[1]
    ys = y0 + (np.arange(shape[0]) + 0.5) / s - obj.cy  # relative to the centre, in pixels
    xs = x0 + (np.arange(shape[1]) + 0.5) / s - obj.cx
    if obj.pattern == "striped":
        band = np.mod(ys + STRIPE_WIDTH / 2, STRIPE_PERIOD) < STRIPE_WIDTH
        return np.broadcast_to(band[:, None], shape).copy()
    if obj.pattern == "dotted":
        dy = np.mod(ys + DOT_SPACING / 2, DOT_SPACING) - DOT_SPACING / 2
        dx = np.mod(xs + DOT_SPACING / 2, DOT_SPACING) - DOT_SPACING / 2
        return dy[:, None] ** 2 + dx[None, :] ** 2 < DOT_RADIUS**2
    raise ValueError(f"unknown pattern {obj.pattern!r}; expected None or one of {PATTERNS}")


def render(
    objects: Sequence[SceneObject], background: str, width: int = 128, height: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Render objects on a flat background: (H, W, 3) uint8 image and (n, H, W) float32 coverages.

    Each pixel is the average of S x S sub-pixels (anti-aliasing). Objects never overlap, so pixels no object
    touches are exactly the background colour, and an object's inside pixels exactly its colour or its ink shade.
    """
    bg = np.array(BACKGROUNDS[background], dtype=np.float64)
    image = np.broadcast_to(bg, (height, width, 3)).copy()
    alphas = np.zeros((len(objects), height, width), dtype=np.float32)
    s = SUPERSAMPLE
    for k, obj in enumerate(objects):
        box, inside = _coverage(obj.shape, obj.cx, obj.cy, obj.radius, width, height)
        x0, y0, x1, y1 = box
        h, w = y1 - y0, x1 - x0
        ink = _ink(obj, box, inside.shape)
        base = np.array(COLOURS[obj.colour], dtype=np.float64)
        sub = np.where(ink[..., None], base * SHADE, base)  # (S*h, S*w, 3) colour of each sub-pixel
        cover = inside.reshape(h, s, w, s).mean(axis=(1, 3))  # (h, w)
        colour_sum = (sub * inside[..., None]).reshape(h, s, w, s, 3).sum(axis=(1, 3)) / (s * s)  # (h, w, 3)
        region = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = np.where(cover[..., None] > 0, region * (1 - cover[..., None]) + colour_sum, region)
        alphas[k, y0:y1, x0:x1] = cover
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), alphas


def _fits(obj: SceneObject, others: Sequence[SceneObject], width: int, height: int) -> bool:
    r = obj.radius
    if not (r + BORDER <= obj.cx <= width - r - BORDER and r + BORDER <= obj.cy <= height - r - BORDER):
        return False
    for other in others:
        if np.hypot(obj.cx - other.cx, obj.cy - other.cy) < r + other.radius + GAP:
            return False
        # Left-to-right order must be unambiguous for the caption.
        if abs(obj.cx - other.cx) < 0.5 * (r + other.radius):
            return False
    return True


def make_scene(
    objects: Sequence[SceneObject],
    background: str,
    width: int = 128,
    height: int = 128,
    mention_size: bool = False,
    seed: int | None = None,
) -> Scene:
    """Render given objects (validated: inside the canvas, non-overlapping) into a Scene."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    ordered = tuple(sorted(objects, key=lambda o: o.cx))
    for k, obj in enumerate(ordered):
        if obj.colour not in COLOURS or obj.shape not in SHAPES or obj.size not in SIZES:
            raise ValueError(f"invalid object {obj}")
        if obj.pattern is not None and obj.pattern not in PATTERNS:
            raise ValueError(f"invalid pattern in {obj}")
        if not _fits(obj, ordered[:k], width, height):
            raise ValueError(f"object {obj} leaves the canvas or overlaps another object")
    image, alphas = render(ordered, background, width, height)
    return Scene(
        image=image,
        caption=caption_for(ordered, background, mention_size),
        objects=ordered,
        background=background,
        alphas=alphas,
        mention_size=mention_size,
        seed=seed,
    )


def generate_scene(
    seed: int,
    width: int = 128,
    height: int = 128,
    n_objects: int | None = None,
    mention_size: bool | None = None,
    pattern_probability: float = 0.0,
) -> Scene:
    """A random scene, deterministic per (seed, arguments).

    `n_objects` (1 or 2) and `mention_size` are drawn from the seed when None (1 object 75% of the time; size named
    30% of the time). Each object gets a pattern with probability `pattern_probability` (none by default).
    """
    rng = np.random.default_rng([seed, width, height])
    count = n_objects if n_objects is not None else (1 if rng.random() < 0.75 else 2)
    if count not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {count}")
    mention = bool(rng.random() < 0.3) if mention_size is None else mention_size
    background = str(rng.choice(list(BACKGROUNDS)))
    for _attempt in range(1000):
        objects: list[SceneObject] = []
        for _ in range(count):
            size = str(rng.choice(SIZES))
            r = SIZE_RADIUS[size]
            pattern = str(rng.choice(PATTERNS)) if rng.random() < pattern_probability else None
            obj = SceneObject(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                size=size,
                pattern=pattern,
                cx=float(rng.uniform(r + BORDER, width - r - BORDER)),
                cy=float(rng.uniform(r + BORDER, height - r - BORDER)),
            )
            if not _fits(obj, objects, width, height):
                break
            objects.append(obj)
        if len(objects) == count:
            return make_scene(objects, background, width, height, mention, seed)
    raise RuntimeError(f"could not place {count} objects on a {width}x{height} canvas")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------- edits
@dataclass(frozen=True)
class Edit:
    """Change one attribute: `kind` in EDIT_KINDS; `value` the new colour / shape / pattern ("none" removes it) /
    size / background; `index` the object, counted left to right (ignored for background edits)."""

    kind: str
    value: str
    index: int = 0


@dataclass
class EditPair:
    """The source scene, its ground-truth edit, and the two captions (which name the size if the edit is a size
    edit). `region` (H, W) bool is where the two images may differ: the edited object's old and new masks, or for a
    background edit everything except the pixels objects cover fully."""

    source: Scene
    target: Scene
    source_caption: str
    target_caption: str
    edit: Edit
    region: np.ndarray = field(repr=False)


def apply_edit(scene: Scene, edit: Edit) -> EditPair:
    """Render the ground-truth result of `edit` on `scene`, everything else identical.

    Raises ValueError when the edit is a no-op or impossible (e.g. growing an object into its neighbour).
    """
    if edit.kind not in ALL_EDIT_KINDS:
        raise ValueError(f"unknown edit kind {edit.kind!r}; expected one of {ALL_EDIT_KINDS}")
    mention = scene.mention_size or edit.kind == "size"
    if edit.kind == "background":
        if edit.value not in BACKGROUNDS or edit.value == scene.background:
            raise ValueError(f"background edit to {edit.value!r} changes nothing or is unknown")
        target = make_scene(scene.objects, edit.value, scene.width, scene.height, mention, scene.seed)
        region = ~np.any(scene.alphas >= 1.0, axis=0)
    else:
        if not 0 <= edit.index < len(scene.objects):
            raise ValueError(f"edit index {edit.index} out of range for {len(scene.objects)} objects")
        obj = scene.objects[edit.index]
        attribute = edit.kind  # SceneObject fields are named after the edit kinds
        value: str | None = None if (edit.kind == "pattern" and edit.value == "none") else edit.value
        allowed = {"colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS + (None,), "size": SIZES}[edit.kind]
        if value not in allowed or getattr(obj, attribute) == value:
            raise ValueError(f"{edit.kind} edit to {edit.value!r} changes nothing or is unknown")
        new_obj = dataclasses.replace(obj, **{attribute: value})
        others = [o for k, o in enumerate(scene.objects) if k != edit.index]
        if not _fits(new_obj, others, scene.width, scene.height):
            raise ValueError(f"{edit} does not fit on the canvas")
        objects = list(scene.objects)
        objects[edit.index] = new_obj
        target = make_scene(objects, scene.background, scene.width, scene.height, mention, scene.seed)
        new_index = target.objects.index(new_obj)
        region = scene.masks[edit.index] | target.masks[new_index]
    source_caption = caption_for(scene.objects, scene.background, mention)
    source = scene if source_caption == scene.caption else dataclasses.replace(scene, caption=source_caption,
                                                                                 mention_size=mention)
    return EditPair(source, target, source_caption, target.caption, edit, region)


def possible_edits(scene: Scene, kinds: Sequence[str] = EDIT_KINDS) -> list[Edit]:
    """Every valid single-attribute edit of the scene of the given kinds, in a fixed order."""
    edits = [Edit("background", b) for b in BACKGROUNDS if b != scene.background]
    for k, obj in enumerate(scene.objects):
        edits += [Edit("colour", c, k) for c in COLOURS if c != obj.colour]
        edits += [Edit("shape", s, k) for s in SHAPES if s != obj.shape]
        if "pattern" in kinds:
            edits += [Edit("pattern", p or "none", k) for p in PATTERNS + (None,) if p != obj.pattern]
        other = "large" if obj.size == "small" else "small"
        others = [o for j, o in enumerate(scene.objects) if j != k]
        if _fits(dataclasses.replace(obj, size=other), others, scene.width, scene.height):
            edits.append(Edit("size", other, k))
    return [e for e in edits if e.kind in kinds]


def random_edit(scene: Scene, seed: int, kind: str | None = None) -> Edit:
    """A valid edit drawn deterministically from `seed`, of the given kind if any (ValueError if none exists)."""
    rng = np.random.default_rng([seed, 7])
    edits = [e for e in possible_edits(scene, ALL_EDIT_KINDS if kind else EDIT_KINDS) if kind is None or e.kind == kind]
    if not edits:
        raise ValueError(f"no valid {kind or ''} edit for this scene")
    if kind is None:  # equal odds per kind, then per edit
        kinds = sorted({e.kind for e in edits}, key=EDIT_KINDS.index)
        chosen = kinds[int(rng.integers(len(kinds)))]
        edits = [e for e in edits if e.kind == chosen]
    return edits[int(rng.integers(len(edits)))]


# --------------------------------------------------------------------------------------------------------- oracle
@dataclass(frozen=True)
class OracleObject:
    colour: str
    shape: str
    pattern: str | None
    size: str
    cx: float
    cy: float
    area: int


@dataclass(frozen=True)
class OracleReport:
    background: str
    objects: tuple[OracleObject, ...]  # left to right


_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)
_COLOUR_NAMES = list(COLOURS)
_BASE_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_INK_RGB = _BASE_RGB * SHADE
#: Pixels farther than this (RGB distance) from the background colour are foreground.
FOREGROUND_DISTANCE = 40.0
MIN_OBJECT_AREA = 40


def _template(shape: str, bbox: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """The shape's mask (H, W) bool fitted to a pixel bounding box (x0, y0, x1, y1), inclusive."""
    x0, y0, x1, y1 = bbox
    ex0, ey0, ex1, ey1 = _extent(shape)
    r = 0.5 * ((x1 - x0 + 1) / (ex1 - ex0) + (y1 - y0 + 1) / (ey1 - ey0))
    cx = (x0 + x1 + 1) / 2 - r * (ex0 + ex1) / 2
    cy = (y0 + y1 + 1) / 2 - r * (ey0 + ey1) / 2
    box, inside = _coverage(shape, cx, cy, r, width, height)
    bx0, by0, bx1, by1 = box
    s = SUPERSAMPLE
    cover = inside.reshape(by1 - by0, s, bx1 - bx0, s).mean(axis=(1, 3))
    mask = np.zeros((height, width), dtype=bool)
    mask[by0:by1, bx0:bx1] = cover >= 0.5
    return mask


def _components(fg: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, as (k, 2) arrays of (y, x)."""
    seen = np.zeros_like(fg)
    height, width = fg.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(pixels))
    return comps


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` whose 4 neighbours are all in `mask`."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _classify_background(image: np.ndarray) -> str:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)  # (k, 3)
    nearest = np.argmin(((border[:, None, :] - _BG_RGB[None]) ** 2).sum(-1), axis=1)
    return _BG_NAMES[Counter(nearest.tolist()).most_common(1)[0][0]]


def _describe(image: np.ndarray, mask: np.ndarray) -> OracleObject:
    """Colour, shape, pattern and size of the object covering `mask` (H, W) bool."""
    height, width = mask.shape
    pixels = image[mask].astype(np.float32)  # (k, 3)
    d_base = ((pixels[:, None] - _BASE_RGB[None]) ** 2).sum(-1)  # (k, 6)
    d_ink = ((pixels[:, None] - _INK_RGB[None]) ** 2).sum(-1)
    d = np.minimum(d_base, d_ink)
    colour_votes = np.bincount(np.argmin(d, axis=1), minlength=len(_COLOUR_NAMES))
    c = int(np.argmax(colour_votes))
    is_ink = np.zeros((height, width), dtype=bool)
    is_ink[mask] = d_ink[:, c] < d_base[:, c]
    interior = _erode(mask)  # anti-aliased edges mix colour and background: judge the pattern inside only
    pattern = None
    if interior.sum() >= 8 and is_ink[interior].mean() > 0.08:
        ink = is_ink & interior
        # Stripes are horizontal: a row that has ink is (nearly) all ink. Dots leave most of every row bare.
        rows = [(ink[y].sum(), ink[y].sum() / interior[y].sum()) for y in range(height) if interior[y].sum() >= 6]
        weight = sum(n for n, _ in rows)
        row_fill = sum(n * f for n, f in rows) / weight if weight else 0.0
        pattern = "striped" if row_fill > 0.7 else "dotted"
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    best, best_iou, best_r = "circle", -1.0, 0.0
    for shape in SHAPES:
        template = _template(shape, bbox, height, width)
        iou = (template & mask).sum() / max((template | mask).sum(), 1)
        if iou > best_iou:
            ex0, ey0, ex1, ey1 = _extent(shape)
            best, best_iou = shape, iou
            best_r = 0.5 * ((bbox[2] - bbox[0] + 1) / (ex1 - ex0) + (bbox[3] - bbox[1] + 1) / (ey1 - ey0))
    size = "small" if best_r < 0.5 * (SIZE_RADIUS["small"] + SIZE_RADIUS["large"]) else "large"
    return OracleObject(_COLOUR_NAMES[c], best, pattern, size, float(xs.mean()), float(ys.mean()), int(mask.sum()))


def oracle(image: np.ndarray | Image.Image, masks: np.ndarray | None = None) -> OracleReport:
    """Read background, and each object's colour / shape / pattern / size, from an RGB image.

    background: the palette background nearest to most border pixels. Objects: the given masks (n, H, W) (bool or
    coverage; thresholded at 0.5), else the 4-connected components of pixels farther than FOREGROUND_DISTANCE from
    the background colour with at least MIN_OBJECT_AREA pixels. Colour: majority vote of the nearest palette colour
    (or its pattern shade) over the object's pixels. Shape: the shape whose outline, fitted to the object's bounding
    box, has the highest IoU with the object's mask. Pattern: share and row structure of shade pixels.
    """
    image = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    background = _classify_background(image)
    if masks is not None:
        object_masks = [np.asarray(m) >= 0.5 if np.asarray(m).dtype != bool else np.asarray(m) for m in masks]
        object_masks = [m for m in object_masks if m.any()]
    else:
        bg = np.array(BACKGROUNDS[background], dtype=np.float32)
        fg = np.sqrt(((image.astype(np.float32) - bg) ** 2).sum(-1)) > FOREGROUND_DISTANCE
        object_masks = []
        for comp in _components(fg):
            if len(comp) >= MIN_OBJECT_AREA:
                m = np.zeros(fg.shape, dtype=bool)
                m[comp[:, 0], comp[:, 1]] = True
                object_masks.append(m)
    objects = sorted((_describe(image, m) for m in object_masks), key=lambda o: o.cx)
    return OracleReport(background, tuple(objects))


#: What `caption_hits` scores: exact per-object reads (objects matched left to right) and the lenient `*_any` ones.
HIT_KEYS = ("background", "count", "colour", "shape", "pattern", "size", "colour_any", "shape_any")


def caption_hits(report: OracleReport, scene: Scene) -> dict:
    """Did an image generated for `scene.caption` show what the caption asks, as the oracle read it (`report`)?

    `background` and `count` are one bool each; the other keys a bool per caption object. Objects are matched left
    to right (when more are detected than asked, the largest ones); if the count is still off, no object matches.
    `size` is scored only when the caption names sizes. `colour_any` / `shape_any` are lenient: the object's colour /
    shape is found on some detected object, wherever it is.
    """
    found = list(report.objects)
    if len(found) > len(scene.objects):
        found = sorted(sorted(found, key=lambda o: -o.area)[: len(scene.objects)], key=lambda o: o.cx)
    hits = {"background": report.background == scene.background, "count": len(report.objects) == len(scene.objects),
            "colour": [], "shape": [], "pattern": [], "size": [],
            "colour_any": [obj.colour in {o.colour for o in report.objects} for obj in scene.objects],
            "shape_any": [obj.shape in {o.shape for o in report.objects} for obj in scene.objects]}
    aligned = len(found) == len(scene.objects)
    for k, obj in enumerate(scene.objects):
        got = found[k] if aligned else None
        for attribute in ("colour", "shape", "pattern") + (("size",) if scene.mention_size else ()):
            hits[attribute].append(got is not None and getattr(got, attribute) == getattr(obj, attribute))
    return hits
