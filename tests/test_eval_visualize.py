"""Rank-list strips and the CMC plot: files, sizes, frame colours, query selection."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reid_lightning.evaluation import save_cmc_curve, save_rank_lists


@pytest.fixture
def gallery(tmp_path):
    """Three queries, four gallery images (tiny solid-colour JPEGs) and their distances."""
    paths = []
    for i in range(7):
        path = tmp_path / "images" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (20, 40), (30 * i, 100, 150)).save(path)
        paths.append(path)
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 0, 0])
    g_pids, g_cams = np.array([1, 2, 2, 3]), np.array([1, 1, 0, 0])
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],  # q0: match g0 first -> AP 1
            [0.1, 0.4, 0.3, 0.2],  # q1: g2 shares pid and camera (skipped); match g1 third -> AP 1/3
            [0.1, 0.2, 0.3, 0.4],  # q2: its only pid-3 item g3 shares its camera -> no valid match
        ],
        dtype=np.float32,
    )
    return distmat, q_pids, g_pids, q_cams, g_cams, paths[:3], paths[3:], tmp_path / "ranks"


# size (32, 16), top_k 3: tiles 16 + 2*4 = 24 wide and 32 + 2*4 = 40 high;
# width 2*6 + 4*24 + 3*6 = 126, height 24 + 40 + 6 = 70
STRIP_SIZE = (126, 70)
FIRST_GALLERY_FRAME = (6 + 24 + 6 + 1, 24 + 1)  # a pixel of the first gallery tile's frame


def test_worst_queries_first_with_expected_size_and_frames(gallery):
    paths = save_rank_lists(*gallery, num_queries=5, order="worst", top_k=3, size=(32, 16))
    # only the two queries with a valid match are ranked, lowest AP first
    assert [p.name for p in paths] == ["00_query1.png", "01_query0.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == STRIP_SIZE
            assert image.format == "PNG"
    with Image.open(paths[0]) as worst, Image.open(paths[1]) as best:
        assert worst.convert("RGB").getpixel(FIRST_GALLERY_FRAME) == (220, 0, 0)  # g0, another pid
        assert best.convert("RGB").getpixel(FIRST_GALLERY_FRAME) == (0, 170, 0)  # g0, a match
        assert best.convert("RGB").getpixel((6 + 1, 24 + 1)) == (40, 90, 200)  # query frame


def test_explicit_query_list_and_placeholders(gallery):
    paths = save_rank_lists(*gallery, order=[2], top_k=6, size=(32, 16))
    assert [p.name for p in paths] == ["00_query2.png"]
    with Image.open(paths[0]) as image:
        # top_k 6: width 2*6 + 7*24 + 6*6 = 216; q2 keeps 3 gallery images, the rest are grey
        assert image.size == (216, 70)
        last_tile_inside = (6 + 6 * (24 + 6) + 12, 24 + 20)
        assert image.convert("RGB").getpixel(last_tile_inside) == (230, 230, 230)


def test_best_order_and_errors(gallery):
    paths = save_rank_lists(*gallery, num_queries=1, order="best", top_k=3, size=(32, 16))
    assert [p.name for p in paths] == ["00_query0.png"]
    with pytest.raises(ValueError, match="out of range"):
        save_rank_lists(*gallery, order=[3])
    with pytest.raises(ValueError, match="order must be"):
        save_rank_lists(*gallery, order="random")
    distmat, *rest = gallery
    with pytest.raises(ValueError, match="3 query and 4 gallery paths"):
        save_rank_lists(distmat[:2], *rest)


def test_cmc_curve_png(tmp_path):
    path = save_cmc_curve(np.linspace(0.6, 1.0, 50), tmp_path / "plots" / "cmc.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (600, 400)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        save_cmc_curve([], tmp_path / "empty.png")


def test_a_second_run_into_the_same_folder_leaves_no_strips_of_the_first(gallery):
    *args, out_dir = gallery
    first = save_rank_lists(*args, out_dir, num_queries=5, order="worst", top_k=3, size=(32, 16))
    assert len(first) == 2
    (out_dir / "notes.png").write_bytes(b"the user's own file")
    second = save_rank_lists(*args, out_dir, order=[2], top_k=3, size=(32, 16))
    # only this run's picture, not 01_query0.png of the first run beside it
    assert sorted(p.name for p in out_dir.glob("*_query*.png")) == [p.name for p in second] == ["00_query2.png"]
    assert (out_dir / "notes.png").exists()
