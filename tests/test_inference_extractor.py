"""FeatureExtractor: input kinds and order, normalisation, flip, folders, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_lightning.inference import FeatureExtractor


@pytest.fixture(scope="module")
def extractor(tiny_checkpoint) -> FeatureExtractor:
    return FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def query_paths(tiny_market_root) -> list[Path]:
    return sorted((tiny_market_root / "query").glob("*.jpg"))


def test_top_level_import_and_checkpoint_config(extractor):
    from reid_lightning import FeatureExtractor as exported

    assert exported is FeatureExtractor
    assert extractor.size == (64, 32)
    assert extractor.flip is False and extractor.device == torch.device("cpu")
    assert not extractor.model.training


def test_paths_pil_arrays_and_tensor_give_the_same_features_in_input_order(extractor, query_paths):
    paths = query_paths[:5]
    pils = [Image.open(p).convert("RGB") for p in paths]
    arrays = [np.asarray(p) for p in pils]
    batch = torch.stack([extractor.transform(p) for p in pils])
    by_path = extractor([str(p) for p in paths])
    assert by_path.shape == (5, 512) and by_path.dtype == torch.float32
    torch.testing.assert_close(extractor(pils), by_path, rtol=0, atol=1e-6)
    torch.testing.assert_close(extractor(arrays), by_path, rtol=0, atol=1e-6)
    torch.testing.assert_close(extractor(batch), by_path, rtol=0, atol=1e-6)
    mixed = extractor([arrays[4], str(paths[3]), pils[2], paths[1], arrays[0]])  # batch_size 4: two batches
    torch.testing.assert_close(mixed, by_path.flip(0), rtol=0, atol=1e-6)
    assert not torch.allclose(by_path[0], by_path[1])


def test_features_are_normalised_unless_asked_and_equal_the_model_output(extractor, query_paths):
    raw = extractor(query_paths[:3], normalize=False)
    normed = extractor(query_paths[:3])
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(normed, torch.nn.functional.normalize(raw, dim=1))
    batch = torch.stack([extractor.transform(Image.open(p).convert("RGB")) for p in query_paths[:3]])
    with torch.no_grad():
        torch.testing.assert_close(raw, extractor.model.model(batch), rtol=0, atol=1e-6)


def test_flip_averages_with_the_mirrored_image(tiny_checkpoint, extractor, query_paths):
    flipped = FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu", flip=True)
    image = Image.open(query_paths[0]).convert("RGB")
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raw = extractor([image, mirrored], normalize=False)
    torch.testing.assert_close(flipped([image], normalize=False)[0], raw.mean(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("16", torch.float16), ("32", torch.float32)])
def test_autocast_precision_runs_the_model_in_it_and_returns_float32(tiny_checkpoint, extractor, query_paths,
                                                                      precision, dtype):
    mixed = FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu", precision=precision, flip=True)
    seen = []
    mixed.model.model.backbone.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    features = mixed(query_paths[:2])
    assert seen and set(seen) == {dtype}  # the backbone really ran in that precision (both flip passes)
    assert features.dtype == torch.float32
    flipped = FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu", flip=True)
    assert torch.nn.functional.cosine_similarity(features, flipped(query_paths[:2])).min() > 0.98


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        ([np.zeros((64, 32, 3), dtype=np.float32)], ValueError, r"image 0: .*uint8.*float32"),
        ([np.zeros((3, 64, 32), dtype=np.uint8)], ValueError, r"image 0: .*shape \(3, 64, 32\)"),
        ([Image.new("RGB", (32, 64)), 5], TypeError, "image 1: .*got int"),
        (torch.zeros(2, 3, 128, 64), ValueError, r"\(N, 3, 64, 32\).*\(2, 3, 128, 64\)"),
        (torch.zeros(2, 3, 64, 32, dtype=torch.uint8), ValueError, "float batch"),
        ("a.jpg", TypeError, "list of images"),
        ([], ValueError, "no images"),
        (["/nonexistent/person.jpg"], RuntimeError, "/nonexistent/person.jpg"),
    ],
)
def test_bad_inputs_are_named(extractor, images, error, match):
    with pytest.raises(error, match=match):
        extractor(images)


def test_bad_precision_and_missing_checkpoint(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu", precision="8")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        FeatureExtractor.from_checkpoint(tmp_path / "missing.ckpt")


@pytest.fixture
def photo_folder(tmp_path, query_paths) -> Path:
    """Two images at the top and one in a sub-folder, plus a text file that is ignored."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for target, source in zip(["b.jpg", "a.png", "sub/c.jpg"], query_paths):
        Image.open(source).save(folder / target)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_extract_folder_walks_recursively_in_name_order(extractor, photo_folder):
    result = extractor.extract_folder(photo_folder)
    assert result.files.names == ["a.png", "b.jpg", "sub/c.jpg"]
    assert result.skipped == []
    torch.testing.assert_close(result.features, extractor([photo_folder / n for n in result.files.names]), rtol=0, atol=1e-6)


def test_extract_folder_takes_a_list_file(extractor, photo_folder):
    list_file = photo_folder / "list.txt"
    list_file.write_text("# gallery\nsub/c.jpg\n\nb.jpg\n")
    result = extractor.extract_folder(list_file)
    assert result.files.names == ["sub/c.jpg", "b.jpg"]
    assert result.files.paths == [(photo_folder / "sub/c.jpg").resolve(), (photo_folder / "b.jpg").resolve()]


def test_corrupt_file_is_named_or_skipped(extractor, photo_folder):
    (photo_folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(RuntimeError, match="broken.jpg"):
        extractor.extract_folder(photo_folder)
    result = extractor.extract_folder(photo_folder, skip_bad=True)
    assert result.files.names == ["a.png", "b.jpg", "sub/c.jpg"]
    assert [name for name, _ in result.skipped] == ["sub/broken.jpg"]
    assert result.features.shape == (3, 512)


def test_empty_or_missing_input_is_an_error(extractor, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty.*holds no images"):
        extractor.extract_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        extractor.extract_folder(tmp_path / "nowhere")


def test_an_image_of_another_format_is_not_read_as_a_list_file(tmp_path, query_paths):
    from reid_lightning.inference.image_files import collect_image_files

    webp = tmp_path / "person.webp"
    Image.open(query_paths[0]).save(webp)
    with pytest.raises(ValueError, match=r"person\.webp is neither an image file \(\.jpg.*\) nor a text file"):
        collect_image_files(webp)
    with pytest.raises(ValueError, match=r"person\.webp is neither"):
        collect_image_files([str(tmp_path / "person.webp")])


def test_a_symlinked_sub_folder_is_searched_and_a_link_loop_ends(tmp_path, query_paths):
    from reid_lightning.inference.image_files import collect_image_files

    elsewhere = tmp_path / "camera2"
    elsewhere.mkdir()
    Image.open(query_paths[0]).save(elsewhere / "x.jpg")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(query_paths[1]).save(folder / "a.jpg")
    (folder / "cam2").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(folder, target_is_directory=True)  # a loop: photos/cam2/back -> photos
    files = collect_image_files(folder)
    assert files.names == ["a.jpg", "cam2/x.jpg"]
    assert files.paths == [(folder / "a.jpg").resolve(), (elsewhere / "x.jpg").resolve()]
