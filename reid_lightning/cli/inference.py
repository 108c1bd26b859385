"""Bodies of ``scripts/extract.py``, ``scripts/export.py`` and ``scripts/search.py``.

Each takes the composed Hydra config of its script (``conf/extract.yaml``, ``conf/export.yaml``,
``conf/search.yaml``)::

    @hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
    def main(cfg):
        run_extract(cfg)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from reid_lightning.data.datasets import build_dataset
from reid_lightning.data.datasets.demo import demo_dir
from reid_lightning.evaluation.visualize import (
    MATCH_COLOUR,
    WRONG_COLOUR,
    draw_rank_strip,
    remove_old_pictures,
)
from reid_lightning.inference.export import (
    FORMATS,
    ExportCheckError,
    export_model,
    verify_export,
    write_model_info,
)
from reid_lightning.inference.extractor import FeatureExtractor, resolve_device
from reid_lightning.inference.image_files import collect_image_files, market_labels
from reid_lightning.inference.search import search_gallery
from reid_lightning.modeling.backbones.pretrained import is_url

log = logging.getLogger(__name__)

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
UNKNOWN_COLOUR = (150, 150, 150)  # frame of a result whose identity is unknown
EXTENSIONS = {"onnx": ".onnx", "torchscript": ".pt"}


def _plain(value: Any) -> Any:
    """A Hydra value as a plain str / list (an input may be given as ``[a,b]``)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _checkpoint_location(location: str | Path) -> str:
    """A checkpoint path made absolute (it is recorded in the outputs), or an ``http(s)://`` URL as given."""
    location = str(location)
    return location if is_url(location) else str(Path(location).resolve())


def _model_options(cfg: DictConfig) -> dict[str, Any]:
    """``model=`` / ``input_size=`` of a script's config as ``FeatureExtractor.from_checkpoint``
    arguments (needed for a fast-reid checkpoint, which stores no config)."""
    model, size = cfg.get("model"), cfg.get("input_size")
    return {"model": _plain(model) if model is not None else None, "size": _plain(size) if size is not None else None}


def run_extract(cfg: DictConfig) -> Path:
    """Extract features of ``cfg.input`` and write them to ``cfg.output`` (``.npz``).

    The file holds ``features`` (N x D, ``cfg.dtype``), ``paths`` (names relative to the
    input), ``files`` (absolute paths), ``pids`` and ``camids`` (parsed from Market-style
    names, else -1), ``skipped`` (unreadable files left out with ``skip_bad``), and how the
    features were made: ``ckpt_path``, ``normalized``, ``flip``, ``input_size`` and
    ``model_config`` (JSON of the ``model=`` given for a fast-reid checkpoint, else empty).

    Returns:
        The written file.
    """
    if cfg.dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {cfg.dtype!r}")
    ckpt_path = _checkpoint_location(cfg.ckpt_path)
    options = _model_options(cfg)
    extractor = FeatureExtractor.from_checkpoint(
        ckpt_path, device=cfg.device, precision=str(cfg.precision), flip=cfg.flip, batch_size=cfg.batch_size, **options
    )
    result = extractor.extract_folder(
        _plain(cfg.input), normalize=cfg.normalize, num_workers=cfg.num_workers, skip_bad=cfg.skip_bad,
        progress=cfg.progress,
    )
    pids, camids = market_labels(result.files.names)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as file:  # a file object: np.savez would append .npz to another name
        np.savez(
            file,
            features=result.features.numpy().astype(FEATURE_DTYPES[cfg.dtype]),
            paths=np.asarray(result.files.names, dtype=str),
            files=np.asarray([str(p) for p in result.files.paths], dtype=str),
            pids=pids, camids=camids,
            skipped=np.asarray([name for name, _ in result.skipped], dtype=str),
            ckpt_path=str(ckpt_path), normalized=bool(cfg.normalize), flip=extractor.flip,
            input_size=np.asarray(extractor.size), model_config=json.dumps(options["model"]) if options["model"] else "",
        )
    log.info("%d images, %d-d features -> %s%s", len(result.files.names), result.features.shape[1], output,
             f" ({len(result.skipped)} unreadable skipped)" if result.skipped else "")
    return output


def _verification_inputs(extractor: FeatureExtractor, cfg: DictConfig) -> list[torch.Tensor]:
    """Random batches of ``cfg.verify_batch_sizes`` plus one batch of real images: those of
    ``cfg.verify_input``, else the query images of the checkpoint's data set when it is on disk."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(int(n), 3, *extractor.size, generator=gen) for n in cfg.verify_batch_sizes]
    if cfg.verify_input is not None:
        paths = collect_image_files(_plain(cfg.verify_input)).paths
    else:
        data = extractor.config.get("data", {})
        try:
            kwargs = data.get("dataset_kwargs", {})
            if data.get("dataset") == "demo" and not demo_dir(data["root"], kwargs.get("seed", 0)).is_dir():
                # reading it would generate it: not worth writing a data set to check an export
                raise FileNotFoundError(f"the demo set is not under {data['root']}")
            paths = [s.path for s in build_dataset(data["dataset"], data["root"], **kwargs).query]
        except (KeyError, FileNotFoundError, ValueError) as err:
            log.warning("verifying on random inputs only: no real images (%s); pass verify_input=<folder> to add some", err)
            return inputs
    inputs.append(extractor.preprocess(paths[:16]))
    return inputs


def run_export(cfg: DictConfig) -> Path:
    """Export the checkpoint's model to ``cfg.output`` and write ``<output without suffix>.json`` beside it;
    with ``cfg.verify`` compare the file with PyTorch first (a failed check removes the file
    and raises :class:`ExportCheckError`).

    Returns:
        The exported model file.
    """
    if cfg.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    ckpt_path = _checkpoint_location(cfg.ckpt_path)
    extractor = FeatureExtractor.from_checkpoint(ckpt_path, device="cpu", flip=cfg.flip, **_model_options(cfg))
    output = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / f"model{EXTENSIONS[cfg.format]}"
    inputs = _verification_inputs(extractor, cfg) if cfg.verify else []
    if cfg.verify and not inputs:
        raise ValueError(
            "nothing to verify the export on: verify_batch_sizes is empty and no real images were found; give "
            "verify_batch_sizes=[1,7], verify_input=<folder of images>, or verify=false"
        )
    export_model(extractor, output, cfg.format, cfg.include_normalize)
    extra: dict[str, Any] = {"checkpoint": str(ckpt_path)}
    if cfg.verify:
        try:
            diffs = verify_export(extractor, output, cfg.format, cfg.include_normalize, inputs, atol=cfg.atol)
        except ExportCheckError as err:
            output.unlink()
            raise ExportCheckError(f"{err}; the exported file was removed (verify=false exports without the check)") from err
        log.info("verified %s against PyTorch: max abs difference per batch %s", output, diffs)
        extra["verified_max_abs_diff"] = max(diffs.values())
    write_model_info(extractor, output, cfg.format, cfg.include_normalize, **extra)
    log.info("exported %s and %s", output, output.with_suffix(".json"))
    return output


def _unique_names(names: list[str], files: list[str], what: str) -> list[str]:
    """``names``, with the absolute path in ``files`` for each name that more than one file has
    (``[camA, camB]`` both holding ``p.jpg``): results are keyed and reported by them."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    shared = sorted(name for name, count in counts.items() if count > 1)
    if not shared:
        return list(names)
    log.warning("%d %s names are the same name of different files (%s): those are reported by absolute path",
                len(shared), what, ", ".join(shared[:5]) + (" ..." if len(shared) > 5 else ""))
    return [str(file) if counts[name] > 1 else name for name, file in zip(names, files)]


def run_search(cfg: DictConfig) -> Path:
    """Rank the gallery of ``cfg.index`` (written by ``scripts/extract.py``) for each image of
    ``cfg.query``; write ``results.json`` and, with ``cfg.rank_lists``, one PNG per query (its
    first ``cfg.rank_list_size`` results).

    ``results.json`` maps each query name to ``[[gallery path, distance], ...]``, nearest
    first; a name that several files share (the same file name in two input folders) is
    replaced by the file's absolute path, for queries and gallery alike. Query features are
    made with the index's checkpoint (or ``cfg.ckpt_path``), model, input size, flip and
    normalisation settings.

    Returns:
        The written ``results.json``.
    """
    index_path = Path(cfg.index)
    if not index_path.is_file():
        raise FileNotFoundError(f"index {index_path} does not exist (write one with scripts/extract.py)")
    with np.load(index_path, allow_pickle=False) as index:
        missing = {"features", "paths", "files", "pids", "ckpt_path", "normalized", "flip"} - set(index.files)
        if missing:
            raise ValueError(f"{index_path} is not a features file of scripts/extract.py: it lacks {sorted(missing)}")
        index = {key: index[key] for key in index.files}
    ckpt_path = cfg.ckpt_path or str(index["ckpt_path"])
    if not cfg.ckpt_path and not is_url(ckpt_path) and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt_path} recorded in {index_path} does not exist: pass ckpt_path=<the checkpoint the "
            "index was extracted with>"
        )
    # the queries are embedded as the gallery was: same model (a fast-reid one's model=) and input size
    options = _model_options(cfg)
    if options["model"] is None and str(index.get("model_config", "")):
        options["model"] = json.loads(str(index["model_config"]))
    if "input_size" in index:
        options["size"] = [int(v) for v in index["input_size"]]
    extractor = FeatureExtractor.from_checkpoint(ckpt_path, device=cfg.device, flip=bool(index["flip"]),
                                                 batch_size=cfg.batch_size, **options)
    query = extractor.extract_folder(
        _plain(cfg.query), normalize=bool(index["normalized"]), num_workers=cfg.num_workers, skip_bad=cfg.skip_bad
    )
    # the distance the checkpoint's run evaluated with, unless metric= is given
    metric = cfg.metric or extractor.config.get("evaluation", {}).get("metric", "cosine")
    distances, indices = search_gallery(
        query.features, torch.from_numpy(index["features"]), top_k=cfg.top_k, metric=metric,
        backend=cfg.backend, device=resolve_device(cfg.device),
    )
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names([str(name) for name in index["paths"]], [str(file) for file in index["files"]], "gallery")
    q_names = _unique_names(query.files.names, [str(file) for file in query.files.paths], "query")
    results = {
        q_name: [[names[g], float(d)] for g, d in zip(idx.tolist(), dist.tolist())]
        for q_name, idx, dist in zip(q_names, indices, distances)
    }
    results_path = out_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    if cfg.rank_lists:
        q_pids, _ = market_labels(query.files.names)
        # pictures of an earlier search into this folder would read as results of this one
        remove_old_pictures(out_dir / "rank_lists", r"\d{4,}_.*\.png")
        (out_dir / "rank_lists").mkdir(exist_ok=True)
        shown = indices[:, : max(1, cfg.rank_list_size)].tolist()  # results.json holds all top_k
        for i, (q_name, q_file, idx) in enumerate(zip(query.files.names, query.files.paths, shown)):
            colours = [
                UNKNOWN_COLOUR if q_pids[i] < 0 or index["pids"][g] < 0
                else MATCH_COLOUR if index["pids"][g] == q_pids[i] else WRONG_COLOUR
                for g in idx
            ]
            strip = draw_rank_strip(q_file, [index["files"][g] for g in idx], colours, f"query {q_name}",
                                    top_k=len(idx), size=extractor.size)
            strip.save(out_dir / "rank_lists" / f"{i:04d}_{Path(q_name).stem}.png")
    log.info("%d queries searched in %d gallery images -> %s", len(results), len(names), results_path)
    return results_path
