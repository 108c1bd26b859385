"""Pictures of retrieval results: rank lists per query and the CMC curve."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from .ranking import ArrayLike, _as_tensor, per_query_metrics

#: Rank-list layout, in pixels: each image sits in a frame BORDER wide; tiles are GAP
#: apart, with MARGIN around them and a TITLE band above. A strip is
#: ``2 * MARGIN + (top_k + 1) * (width + 2 * BORDER) + top_k * GAP`` wide and
#: ``TITLE + height + 2 * BORDER + MARGIN`` high.
BORDER, GAP, MARGIN, TITLE = 4, 6, 6, 24
QUERY_COLOUR, MATCH_COLOUR, WRONG_COLOUR = (40, 90, 200), (0, 170, 0), (220, 0, 0)
BACKGROUND, EMPTY = (255, 255, 255), (230, 230, 230)


# save_rank_lists' orders by AP (or an explicit list of query indices)
RANK_LIST_ORDERS = ("worst", "best")


def _select_queries(ap: np.ndarray, order: str | Sequence[int], num_queries: int) -> list[int]:
    num_q = ap.shape[0]
    if isinstance(order, str):
        if order not in RANK_LIST_ORDERS:
            raise ValueError(f"order must be 'worst', 'best' or a list of query indices, got {order!r}.")
        valid = np.flatnonzero(~np.isnan(ap))
        ranked = valid[np.argsort(ap[valid] if order == "worst" else -ap[valid], kind="stable")]
        return [int(q) for q in ranked[:num_queries]]
    chosen = [int(q) for q in order]
    bad = [q for q in chosen if not 0 <= q < num_q]
    if bad:
        raise ValueError(f"query indices {bad} are out of range for {num_q} queries.")
    return chosen


def _tile(path: str | Path | None, size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    height, width = size
    tile = Image.new("RGB", (width + 2 * BORDER, height + 2 * BORDER), colour)
    if path is not None:
        with Image.open(path) as image:
            tile.paste(image.convert("RGB").resize((width, height), Image.BILINEAR), (BORDER, BORDER))
    return tile


def remove_old_pictures(out_dir: str | Path, pattern: str) -> int:
    """Delete the pictures of an earlier run in ``out_dir``: files whose whole name matches the
    regular expression ``pattern`` (the names this package writes there), so that a run into an
    existing folder does not leave them beside its own. Returns how many were removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    old = [path for path in out_dir.iterdir() if path.is_file() and re.fullmatch(pattern, path.name)]
    for path in old:
        path.unlink()
    return len(old)


RANK_LIST_NAME = r"\d{2,}_query\d+\.png"  # save_rank_lists' file names


def save_rank_lists(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    q_paths: Sequence[str | Path],
    g_paths: Sequence[str | Path],
    out_dir: str | Path,
    num_queries: int = 10,
    order: str | Sequence[int] = "worst",
    top_k: int = 10,
    size: tuple[int, int] = (128, 64),
) -> list[Path]:
    """Save one PNG per query: the query image, then its top-k gallery images.

    Called as ``save_rank_lists(distmat, q_pids, g_pids, q_camids, g_camids, q_paths,
    g_paths, "out/ranks")``. The Market rule applies (gallery images of the query's pid
    and camera are skipped); ties keep gallery order. Frames: blue for the query, green
    for a gallery image of the query's pid, red otherwise; the title gives the query
    index, pid, camera and AP. A query with fewer than ``top_k`` kept gallery images
    gets grey placeholders, so every strip has the size given in the module docstring.

    Args:
        distmat: ``(num_query, num_gallery)`` distances.
        q_pids, g_pids, q_camids, g_camids: identities and cameras, as for ``evaluate_rank``.
        q_paths: image file of each query.
        g_paths: image file of each gallery item.
        out_dir: folder for the PNGs (created); files are named ``NN_queryQ.png``. Such files
            of an earlier run in the folder are removed first.
        num_queries: how many queries for ``order="worst"``/``"best"``.
        order: ``"worst"`` (lowest AP first) or ``"best"`` among queries with a valid
            match, or an explicit list of query indices (then ``num_queries`` is ignored).
        top_k: gallery images per strip.
        size: ``(height, width)`` of every image in the strip.

    Returns:
        The paths of the written PNGs, in selection order.
    """
    dist = _as_tensor(distmat)
    q_pid_arr, g_pid_arr = np.asarray(_as_tensor(q_pids).cpu()), np.asarray(_as_tensor(g_pids).cpu())
    q_cam_arr, g_cam_arr = np.asarray(_as_tensor(q_camids).cpu()), np.asarray(_as_tensor(g_camids).cpu())
    if len(q_paths) != dist.shape[0] or len(g_paths) != dist.shape[1]:
        raise ValueError(
            f"{len(q_paths)} query and {len(g_paths)} gallery paths for a distmat of shape {tuple(dist.shape)}."
        )
    ap = per_query_metrics(dist, q_pid_arr, g_pid_arr, q_cam_arr, g_cam_arr)["ap"]
    selected = _select_queries(ap, order, num_queries)
    out_dir = Path(out_dir)
    remove_old_pictures(out_dir, RANK_LIST_NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for position, q in enumerate(selected):
        row = dist[q].float().cpu().numpy()
        kept = np.flatnonzero((g_pid_arr != q_pid_arr[q]) | (g_cam_arr != q_cam_arr[q]))
        top = kept[np.argsort(row[kept], kind="stable")][:top_k]
        colours = [MATCH_COLOUR if g_pid_arr[g] == q_pid_arr[q] else WRONG_COLOUR for g in top]
        ap_text = "n/a" if np.isnan(ap[q]) else f"{100 * ap[q]:.1f}%"
        title = f"query {q}  pid {q_pid_arr[q]}  cam {q_cam_arr[q]}  AP {ap_text}"
        strip = draw_rank_strip(q_paths[q], [g_paths[g] for g in top], colours, title, top_k=top_k, size=size)
        path = out_dir / f"{position:02d}_query{q}.png"
        strip.save(path)
        written.append(path)
    return written


def draw_rank_strip(
    query_path: str | Path,
    gallery_paths: Sequence[str | Path],
    colours: Sequence[tuple[int, int, int]],
    title: str,
    top_k: int = 10,
    size: tuple[int, int] = (128, 64),
) -> Image.Image:
    """One rank list as a picture: the query in a blue frame, then the ranked gallery images.

    Called as ``draw_rank_strip("q.jpg", ["g1.jpg", "g2.jpg"], [MATCH_COLOUR, WRONG_COLOUR],
    "query 0").save("q.png")`` (by :func:`save_rank_lists` and ``scripts/search.py``). Slots
    beyond ``gallery_paths`` get grey placeholders, so the strip always has the size given
    in the module docstring.

    Args:
        query_path: the query image.
        gallery_paths: the ranked gallery images, nearest first (at most ``top_k`` are drawn).
        colours: frame colour of each gallery image.
        title: text above the strip.
        top_k: gallery slots.
        size: ``(height, width)`` of every image in the strip.

    Returns:
        The RGB picture.
    """
    height, width = size
    tile_w, tile_h = width + 2 * BORDER, height + 2 * BORDER
    strip = Image.new("RGB", (2 * MARGIN + (top_k + 1) * tile_w + top_k * GAP, TITLE + tile_h + MARGIN), BACKGROUND)
    strip.paste(_tile(query_path, size, QUERY_COLOUR), (MARGIN, TITLE))
    for slot in range(top_k):
        tile = _tile(gallery_paths[slot], size, colours[slot]) if slot < len(gallery_paths) else _tile(None, size, EMPTY)
        strip.paste(tile, (MARGIN + (slot + 1) * (tile_w + GAP), TITLE))
    ImageDraw.Draw(strip).text((MARGIN, 6), title, fill=(0, 0, 0))
    return strip


def save_cmc_curve(cmc: Sequence[float] | np.ndarray, out_path: str | Path, label: str | None = None) -> Path:
    """Plot a CMC curve (fractions, as ``evaluate_rank`` returns) to a 600 x 400 PNG.

    Called as ``save_cmc_curve(evaluate_rank(...)["cmc"], "out/cmc.png")``.

    Args:
        cmc: matching rate at ranks 1..len(cmc), in ``[0, 1]``.
        out_path: PNG file to write (its folder is created).
        label: legend text; default ``"Rank-1 xx.x%"``.

    Returns:
        ``out_path`` as a Path.
    """
    cmc = np.asarray(cmc, dtype=np.float64)
    if cmc.ndim != 1 or cmc.size == 0:
        raise ValueError(f"cmc must be a non-empty 1-D sequence, got shape {cmc.shape}.")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ranks = np.arange(1, cmc.size + 1)
    ax.plot(ranks, 100 * cmc, marker="o", markersize=3, label=label or f"Rank-1 {100 * cmc[0]:.1f}%")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, max(cmc.size, 2))
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path
