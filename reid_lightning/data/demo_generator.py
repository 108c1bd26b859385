"""Generator of the embedded synthetic demo data set: pedestrian-like crops drawn
with PIL, written in the Market-1501 layout and naming
(``bounding_box_train/``, ``query/``, ``bounding_box_test/``, ``0001_c1s1_000123_00.jpg``).

Every identity wears a colour scheme (top and bottom colour, top pattern, hair,
shoes, an optional bag, sleeve and trouser length, build) drawn from small
palettes, so identities share colours and colour alone does not tell them apart.
Every image varies the pose (walking phase, front/back/side view, facing),
scale, placement and lighting; every camera adds its own background, colour
cast, brightness, noise and blur. Test identities get one query image per camera
they appear in; the gallery also holds distractors (pid 0) and junk (pid -1), as
Market-1501 does. The output depends on the arguments only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

DEMO_VERSION = 1
MARKER_FILE = ".complete"
DEFAULT_NUM_CAMS = 4
SUPERSAMPLE = 2

TOP_COLOURS = [
    (200, 30, 40), (30, 60, 170), (240, 240, 235), (25, 25, 30),
    (40, 140, 60), (235, 200, 40), (120, 120, 125), (150, 60, 150),
]
BOTTOM_COLOURS = [(30, 40, 90), (20, 20, 25), (110, 110, 115), (190, 170, 130), (90, 60, 40), (230, 230, 225)]
HAIR_COLOURS = [(20, 15, 10), (90, 55, 25), (210, 180, 110), (150, 150, 150)]
SKIN_COLOURS = [(235, 200, 170), (200, 150, 110), (120, 80, 55)]
SHOE_COLOURS = [(20, 20, 20), (240, 240, 240), (120, 70, 40)]
BAG_COLOURS = [(20, 20, 20), (160, 30, 30), (40, 70, 150), (140, 110, 60), (60, 110, 60)]
PATTERNS = ("plain", "hstripes", "vstripes", "checks")
BAGS = ("none", "backpack", "shoulder")


@dataclass(frozen=True)
class _Look:
    """What an identity wears and how it is built; fixed across its images."""

    top: tuple[int, int, int]
    top2: tuple[int, int, int]
    pattern: str
    bottom: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    long_hair: bool
    shoes: tuple[int, int, int]
    bag: str
    bag_colour: tuple[int, int, int]
    long_sleeves: bool
    shorts: bool
    build: float


@dataclass(frozen=True)
class _Camera:
    """How a camera renders: background colours, colour cast, brightness, noise and blur."""

    background: tuple[np.ndarray, np.ndarray]
    gains: np.ndarray
    brightness: float
    noise: float
    blur: float


def _pick(rng: np.random.Generator, palette: list) -> tuple[int, int, int]:
    return palette[int(rng.integers(len(palette)))]


def _random_look(rng: np.random.Generator) -> _Look:
    top = _pick(rng, TOP_COLOURS)
    return _Look(
        top=top,
        top2=_pick(rng, [c for c in TOP_COLOURS if c != top]),
        pattern=PATTERNS[int(rng.choice(len(PATTERNS), p=[0.4, 0.25, 0.15, 0.2]))],
        bottom=_pick(rng, BOTTOM_COLOURS),
        skin=_pick(rng, SKIN_COLOURS),
        hair=_pick(rng, HAIR_COLOURS),
        long_hair=bool(rng.random() < 0.35),
        shoes=_pick(rng, SHOE_COLOURS),
        bag=BAGS[int(rng.choice(len(BAGS), p=[0.5, 0.3, 0.2]))],
        bag_colour=_pick(rng, BAG_COLOURS),
        long_sleeves=bool(rng.random() < 0.5),
        shorts=bool(rng.random() < 0.25),
        build=float(rng.uniform(0.8, 1.2)),
    )


def _random_camera(rng: np.random.Generator) -> _Camera:
    return _Camera(
        background=(rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)),
        gains=rng.uniform(0.75, 1.25, 3),
        brightness=float(rng.uniform(-25, 25)),
        noise=float(rng.uniform(3, 12)),
        blur=float(rng.choice([0.0, 0.5, 0.9, 1.3])),
    )


def _background(rng: np.random.Generator, camera: _Camera, height: int, width: int) -> np.ndarray:
    """A vertical gradient between the camera's two colours, jittered, with a few clutter blocks."""
    top, bottom = (c + rng.normal(0, 12, 3) for c in camera.background)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    image = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).copy()
    for _ in range(int(rng.integers(0, 4))):
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, x1 = y0 + int(rng.integers(8, height // 2)), x0 + int(rng.integers(8, width // 2))
        image[y0:y1, x0:x1] = rng.uniform(30, 230, 3)
    return image


def _draw_person(
    draw: ImageDraw.ImageDraw,
    look: _Look,
    rng: np.random.Generator,
    width: int,
    height: int,
    offset: tuple[float, float],
) -> None:
    """Draws one person with a random pose on a canvas of ``width`` x ``height`` pixels."""
    ph = height * rng.uniform(0.78, 0.95)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width + offset[0] * width
    top = rng.uniform(0.01, height - ph) + offset[1] * height
    view = ("front", "back", "side")[int(rng.integers(3))]
    facing = 1 if rng.random() < 0.5 else -1
    phase = rng.uniform(-1, 1)
    tw = 0.15 * ph * look.build * (0.65 if view == "side" else 1.0)
    y_shoulder, y_hip, y_foot = top + 0.16 * ph, top + 0.52 * ph, top + 0.97 * ph
    lw = 0.055 * ph * look.build

    def rect(x0: float, y0: float, x1: float, y1: float, colour: tuple[int, int, int]) -> None:
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=colour)

    def limb(x0: float, y0: float, x1: float, y1: float, half: float, colour: tuple[int, int, int]) -> None:
        draw.polygon([(x0 - half, y0), (x0 + half, y0), (x1 + half, y1), (x1 - half, y1)], fill=colour)

    # legs (shorts show skin below the knee), then shoes
    for side in (-1, 1):
        hip_x = cx + side * tw * 0.5
        foot_x = hip_x + side * phase * 0.09 * ph * (1 if view != "side" else 1.6)
        knee_x, knee_y = (hip_x + foot_x) / 2, (y_hip + y_foot) / 2
        limb(hip_x, y_hip, foot_x, y_foot, lw, look.skin if look.shorts else look.bottom)
        if look.shorts:
            limb(hip_x, y_hip, knee_x, knee_y - 0.05 * ph, lw * 1.1, look.bottom)
        toe = foot_x + facing * lw * 0.4
        draw.ellipse([toe - lw * 1.3, y_foot - lw * 0.8, toe + lw * 1.3, y_foot + lw * 0.5], fill=look.shoes)
    rect(cx - tw, y_hip - 0.02 * ph, cx + tw, y_hip + 0.08 * ph, look.bottom)

    if view == "side" and look.bag == "backpack":
        back = cx - facing * tw
        rect(back, y_shoulder + 0.03 * ph, back - facing * 0.1 * ph, y_shoulder + 0.3 * ph, look.bag_colour)

    # torso with its pattern
    rect(cx - tw, y_shoulder, cx + tw, y_hip, look.top)
    if look.pattern == "hstripes":
        for y in np.arange(y_shoulder + 0.03 * ph, y_hip, 0.07 * ph):
            rect(cx - tw, y, cx + tw, y + 0.03 * ph, look.top2)
    elif look.pattern == "vstripes":
        for x in np.arange(cx - tw + 0.02 * ph, cx + tw, 0.06 * ph):
            rect(x, y_shoulder, min(x + 0.025 * ph, cx + tw), y_hip, look.top2)
    elif look.pattern == "checks":
        cell = 0.06 * ph
        for i, y in enumerate(np.arange(y_shoulder, y_hip - 1, cell)):
            for j, x in enumerate(np.arange(cx - tw, cx + tw - 1, cell)):
                if (i + j) % 2:
                    rect(x, y, min(x + cell, cx + tw), min(y + cell, y_hip), look.top2)

    if look.bag == "backpack" and view == "back":
        rect(cx - tw * 0.75, y_shoulder + 0.03 * ph, cx + tw * 0.75, y_shoulder + 0.3 * ph, look.bag_colour)
    elif look.bag == "backpack" and view == "front":
        for side in (-1, 1):
            rect(cx + side * tw * 0.55, y_shoulder, cx + side * tw * 0.35, y_hip - 0.1 * ph, look.bag_colour)
    elif look.bag == "shoulder":
        strap = [(cx - facing * tw, y_shoulder), (cx + facing * tw, y_hip - 0.05 * ph)]
        draw.line(strap, fill=look.bag_colour, width=max(1, int(0.02 * ph)))
        front = cx + facing * tw
        bag_top, bag_bottom = y_hip - 0.08 * ph, y_hip + 0.07 * ph
        rect(front - facing * tw * 0.3, bag_top, front + facing * 0.09 * ph, bag_bottom, look.bag_colour)

    # arms swing against the legs
    arm_sides = (facing,) if view == "side" else (-1, 1)
    for side in arm_sides:
        sx, sy = cx + side * tw, y_shoulder + 0.02 * ph
        swing = -side * phase * 0.08 * ph if view != "side" else -phase * 0.12 * ph
        hx, hy = sx + side * 0.03 * ph + swing, y_shoulder + 0.34 * ph
        half = 0.03 * ph * look.build
        limb(sx, sy, hx, hy, half, look.top if look.long_sleeves else look.skin)
        if not look.long_sleeves:
            limb(sx, sy, (sx + hx) / 2, (sy + hy) / 2 - 0.04 * ph, half * 1.15, look.top)
        draw.ellipse([hx - half, hy - half, hx + half, hy + half * 1.4], fill=look.skin)

    # head and hair
    hr = 0.065 * ph
    hy = top + 0.08 * ph
    rect(cx - hr * 0.4, hy, cx + hr * 0.4, y_shoulder + 1, look.skin)
    if look.long_hair:
        rect(cx - hr * 0.95, hy, cx + hr * 0.95, y_shoulder + 0.1 * ph, look.hair)
    draw.ellipse([cx - hr * 0.85, hy - hr, cx + hr * 0.85, hy + hr], fill=look.hair if view == "back" else look.skin)
    if view == "front":
        draw.chord([cx - hr * 0.9, hy - hr * 1.1, cx + hr * 0.9, hy + hr * 0.6], 180, 360, fill=look.hair)
    elif view == "side":
        start = 90 if facing > 0 else -90
        draw.pieslice([cx - hr * 0.9, hy - hr * 1.1, cx + hr * 0.9, hy + hr], start, start + 180, fill=look.hair)


def _render(
    rng: np.random.Generator,
    look: _Look | None,
    camera: _Camera,
    size: tuple[int, int],
    offset: tuple[float, float] = (0.0, 0.0),
    extra_blur: float = 0.0,
) -> Image.Image:
    """Renders one crop of ``size`` (height, width); ``look=None`` gives background only."""
    height, width = size
    canvas_h, canvas_w = height * SUPERSAMPLE, width * SUPERSAMPLE
    image = Image.fromarray(_background(rng, camera, canvas_h, canvas_w).clip(0, 255).astype(np.uint8))
    if look is not None:
        _draw_person(ImageDraw.Draw(image), look, rng, canvas_w, canvas_h, offset)
    if rng.random() < 0.1:  # an occluding object in the lower part
        draw = ImageDraw.Draw(image)
        y0 = canvas_h * rng.uniform(0.6, 0.85)
        x0 = canvas_w * rng.uniform(-0.3, 0.6)
        x1 = x0 + canvas_w * rng.uniform(0.3, 0.6)
        draw.rectangle([x0, y0, x1, canvas_h], fill=tuple(int(v) for v in rng.integers(30, 230, 3)))
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    pixels = pixels * camera.gains * rng.uniform(0.9, 1.1) + camera.brightness
    pixels += rng.normal(0, camera.noise, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    radius = camera.blur + extra_blur
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image


@dataclass(frozen=True)
class DemoSpec:
    """The arguments a demo set is generated from (see :func:`generate_demo_dataset`);
    stored as JSON in the set's marker file."""

    seed: int
    num_ids: int
    images_per_id: int
    num_cams: int
    size: tuple[int, int]
    num_distractors: int
    num_junk: int

    def validate(self) -> None:
        """Raises ValueError naming the arguments when one lies outside its range."""
        if (
            self.num_ids < 2
            or self.images_per_id < 4
            or not 2 <= self.num_cams <= 9
            or min(self.size) < 16
            or min(self.num_distractors, self.num_junk) < 0
        ):
            raise ValueError(
                "demo set needs num_ids >= 2, images_per_id >= 4, 2 <= num_cams <= 9, sizes >= 16 and "
                f"non-negative counts; got num_ids={self.num_ids}, images_per_id={self.images_per_id}, "
                f"num_cams={self.num_cams}, size={self.size}, num_distractors={self.num_distractors}, "
                f"num_junk={self.num_junk}"
            )

    def marker_text(self) -> str:
        """The marker file's content: the version and the arguments as JSON."""
        return json.dumps({"version": DEMO_VERSION, **asdict(self), "size": list(self.size)}, sort_keys=True)


def is_complete(out_dir: Path, spec: DemoSpec) -> bool:
    """Tells whether ``out_dir`` holds a finished demo set made from ``spec``."""
    try:
        return (Path(out_dir) / MARKER_FILE).read_text() == spec.marker_text()
    except OSError:
        return False


def _write_images(out_dir: Path, spec: DemoSpec) -> None:
    """Draws and writes every image of the demo set into ``out_dir``."""
    rng = np.random.default_rng(spec.seed)
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (out_dir / split).mkdir(parents=True)
    cameras = [_random_camera(rng) for _ in range(spec.num_cams)]
    frame = 0

    def save(image: Image.Image, split: str, pid: int, camid: int) -> None:
        nonlocal frame
        frame += 1
        name = f"{pid:04d}" if pid >= 0 else str(pid)
        image.save(out_dir / split / f"{name}_c{camid + 1}s1_{frame:06d}_00.jpg", quality=90)

    pids = rng.permutation(np.arange(1, spec.num_ids + 1))
    train_pids = set(pids[: spec.num_ids // 2].tolist())
    low, high = max(4, round(spec.images_per_id * 0.75)), max(4, round(spec.images_per_id * 1.25))
    for pid in sorted(pids.tolist()):
        look = _random_look(rng)
        count = int(rng.integers(low, high + 1))
        num_used = int(rng.integers(2, min(spec.num_cams, count // 2) + 1))
        used = rng.choice(spec.num_cams, size=num_used, replace=False)
        # at least two images per camera used, so every query has a gallery match in that camera too
        assignment = np.concatenate([np.repeat(used, 2), rng.choice(used, size=count - 2 * num_used)])
        queried: set[int] = set()
        for camid in assignment.tolist():
            image = _render(rng, look, cameras[camid], spec.size)
            if pid in train_pids:
                split = "bounding_box_train"
            elif camid not in queried:
                queried.add(camid)
                split = "query"
            else:
                split = "bounding_box_test"
            save(image, split, pid, camid)
    for pid, count in ((0, spec.num_distractors), (-1, spec.num_junk)):
        for _ in range(count):
            camid = int(rng.integers(spec.num_cams))
            look = _random_look(rng) if rng.random() < 0.8 else None
            offset = (float(rng.uniform(-0.45, 0.45)), float(rng.uniform(-0.5, 0.5)))
            image = _render(rng, look, cameras[camid], spec.size, offset, extra_blur=2.5 if pid < 0 else 0.0)
            save(image, "bounding_box_test", pid, camid)


def generate_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_ids: int = 120,
    images_per_id: int = 20,
    num_cams: int = DEFAULT_NUM_CAMS,
    size: tuple[int, int] = (128, 64),
    num_distractors: int = 100,
    num_junk: int = 40,
) -> Path:
    """Generates the synthetic demo set in the Market-1501 layout, unless ``out_dir``
    already holds a complete one made from the same arguments.

    Half the identities (chosen by the seed) form the training split. Each identity
    has 75-125% of ``images_per_id`` images spread over 2 or more cameras; a test
    identity gives one query per camera it appears in, the rest go to the gallery
    together with ``num_distractors`` distractors (pid 0) and ``num_junk`` junk
    images (pid -1). The defaults give about 2,500 images in well under a minute
    (about 7 s on one CPU core).

    The set is written into a temporary sibling folder, finished by a marker file
    holding the arguments, then renamed to ``out_dir``: an interrupted run leaves
    no half-written set behind, and a set made from other arguments is replaced.

    Args:
        out_dir: folder to create.
        seed: seed of every random choice; equal arguments give identical files.
        num_ids: number of identities (at least 2).
        images_per_id: mean number of images per identity (at least 4).
        num_cams: number of cameras, 2..9.
        size: image (height, width) in pixels, each at least 16.
        num_distractors: number of distractor images (pid 0) in the gallery.
        num_junk: number of junk images (pid -1) in the gallery.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: an argument outside its range.
    """
    spec = DemoSpec(seed, num_ids, images_per_id, num_cams, (int(size[0]), int(size[1])), num_distractors, num_junk)
    spec.validate()
    out_dir = Path(out_dir)
    if is_complete(out_dir, spec):
        return out_dir
    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    _write_images(partial, spec)
    (partial / MARKER_FILE).write_text(spec.marker_text())
    if is_complete(out_dir, spec):  # another process finished the same set meanwhile
        shutil.rmtree(partial)
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        partial.rename(out_dir)
    except OSError:
        if not is_complete(out_dir, spec):  # not a concurrent writer's finished set
            raise
        shutil.rmtree(partial)
    log.info("generated the demo data set in %s in %.1f s", out_dir, time.perf_counter() - start)
    return out_dir
