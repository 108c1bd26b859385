"""fast-reid checkpoints: key mapping onto Baseline, model.pretrained / init_from / eval.py, and the
features of fast-reid 1.4.0's own bot_r18 checkpoint reproduced (../shared/fastreid_reference)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, compose_train, run_script
from hydra.utils import instantiate
from PIL import Image

from reid_lightning.checkpointing.load import load_model_checkpoint, load_model_weights
from reid_lightning.data.transforms import build_test_transforms
from reid_lightning.engine.module import ReIDModule
from reid_lightning.modeling import build_bot, is_fastreid_checkpoint

REFERENCE = SHARED / "fastreid_reference" / "bot_r18"
MINI_MARKET = SHARED / "data" / "mini_market1501"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "model_final.pth").is_file() or not MINI_MARKET.is_dir(), reason=f"{REFERENCE} is absent"
)


def fastreid_state(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under fast-reid's key names, float16, the trainable ones views of one
    flat storage (as fast-reid's ContiguousParams leaves them)."""
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith("head.bnneck."):
            key = "heads.bottleneck.0." + key[len("head.bnneck.") :]
        elif key == "head.classifier.weight":
            key = "heads.weight"
        renamed[key] = value.half() if value.is_floating_point() else value
    trainable = [k for k, v in renamed.items() if v.is_floating_point() and "running_" not in k]
    flat = torch.cat([renamed[k].flatten() for k in trainable])
    offset = 0
    for key in trainable:
        n = renamed[key].numel()
        renamed[key] = flat[offset : offset + n].view_as(renamed[key])
        offset += n
    return renamed


def write_fastreid_checkpoint(model, path: Path) -> Path:
    torch.save({"model": fastreid_state(model), "lr_sched": {"milestones": {40: 1}}, "epoch": 3, "metric": -1}, path)
    return path


@pytest.fixture(scope="module")
def source_bot():
    torch.manual_seed(0)
    model = build_bot(num_classes=5, depth=18, stem_pool="fastreid")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.8, 1.2)
    return model.eval()


def assert_same_weights(model, source) -> None:
    for key, value in source.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(model.state_dict()[key], expected), key


def test_fastreid_checkpoint_fills_backbone_bnneck_and_classifier(tmp_path, source_bot):
    path = write_fastreid_checkpoint(source_bot, tmp_path / "model_final.pth")
    assert is_fastreid_checkpoint(torch.load(path, weights_only=True))
    model = build_bot(num_classes=5, depth=18, stem_pool="fastreid", pretrained=str(path))
    assert_same_weights(model, source_bot)
    assert model.head.classifier.weight.dtype == torch.float32


def test_classifier_of_another_size_is_kept_fresh_with_a_warning(tmp_path, source_bot, caplog):
    path = write_fastreid_checkpoint(source_bot, tmp_path / "model_final.pth")
    with caplog.at_level(logging.WARNING, logger="reid_lightning.modeling.fastreid_checkpoint"):
        model = build_bot(num_classes=7, depth=18, stem_pool="fastreid", pretrained=str(path))
    assert "a classifier of 5 identities (5, 512)" in caplog.text and "7 identities" in caplog.text
    assert model.head.classifier.weight.shape == (7, 512)
    assert torch.equal(model.head.bnneck.running_var, source_bot.head.bnneck.running_var.half().float())
    assert torch.equal(model.backbone.layer4[1].bn2.weight, source_bot.backbone.layer4[1].bn2.weight.half().float())


def test_fastreid_checkpoint_from_a_url_goes_through_the_hub_cache(monkeypatch, tmp_path, source_bot):
    path = write_fastreid_checkpoint(source_bot, tmp_path / "market_bot_R18.pth")
    requested = []

    def fake_download(url, **kwargs):
        requested.append(url)
        return torch.load(path, map_location="cpu", weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    url = "https://github.com/JDAI-CV/fast-reid/releases/download/v0.1.1/market_bot_R18.pth"
    model = build_bot(num_classes=5, depth=18, stem_pool="fastreid", pretrained=url)
    assert requested == [url]
    assert_same_weights(model, source_bot)


def test_parts_our_model_lacks_are_named(tmp_path, source_bot):
    state = fastreid_state(source_bot)
    state["heads.bottleneck.1.weight"] = torch.ones(512)  # an extra neck layer (EMBEDDING_DIM) we do not build
    torch.save({"model": state}, tmp_path / "other_head.pth")
    with pytest.raises(RuntimeError, match=r"does not have: heads\.bottleneck\.1\.weight"):
        build_bot(num_classes=5, depth=18, pretrained=str(tmp_path / "other_head.pth"))


def test_backbone_parts_our_model_lacks_are_named(tmp_path, source_bot):
    """fast-reid's non-local / SE blocks (AGW, SBS models) must not be dropped with a mere log line."""
    state = fastreid_state(source_bot)
    state["backbone.NL_2.0.g.weight"] = torch.zeros(128, 256, 1, 1)
    torch.save({"model": state}, tmp_path / "agw.pth")
    with pytest.raises(RuntimeError, match=r"backbone has parts .*: backbone\.NL_2\.0\.g\.weight"):
        build_bot(num_classes=5, depth=18, stem_pool="fastreid", pretrained=str(tmp_path / "agw.pth"))


def test_older_fastreid_names_and_learnable_gem_map(tmp_path):
    torch.manual_seed(1)
    source = build_bot(num_classes=4, depth=18, pooling="gem_learnable")
    with torch.no_grad():
        source.head.pool.p.fill_(2.5)
    state = {k.replace("heads.weight", "heads.classifier.weight"): v for k, v in fastreid_state(source).items()}
    state["heads.pool_layer.p"] = state.pop("head.pool.p")
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    torch.save({"model": state, "iteration": 100}, tmp_path / "old.pth")
    model = build_bot(num_classes=4, depth=18, pooling="gem_learnable", pretrained=str(tmp_path / "old.pth"))
    assert_same_weights(model, source)
    expected = r"pooling of .*\(heads\.pool_layer\.\*: \['p'\]\) does not match the model's GlobalAvgPool"
    with pytest.raises(RuntimeError, match=expected):
        build_bot(num_classes=4, depth=18, pretrained=str(tmp_path / "old.pth"))


def test_fastreid_gem_and_gemp_checkpoints_load(tmp_path):
    """fast-reid's GeneralizedMeanPoolingP saves ``heads.pool_layer.p`` as ``ones(1) * p`` (shape [1]);
    its GeneralizedMeanPooling keeps p = 3 as a plain attribute and saves nothing."""
    torch.manual_seed(2)
    source = build_bot(num_classes=4, depth=18, pooling="gem_learnable")
    with torch.no_grad():
        source.head.pool.p.fill_(2.5)
    state = fastreid_state(source)
    state["heads.pool_layer.p"] = state.pop("head.pool.p").reshape(1)
    torch.save({"model": state}, tmp_path / "gemp.pth")
    model = build_bot(num_classes=4, depth=18, pooling="gem_learnable", pretrained=str(tmp_path / "gemp.pth"))
    assert_same_weights(model, source)
    module = ReIDModule(build_bot(num_classes=4, depth=18, pooling="gem_learnable"))
    load_model_weights(module, load_model_checkpoint(tmp_path / "gemp.pth")["state_dict"], source="gemp", strict=True)
    assert_same_weights(module.model, source)

    del state["heads.pool_layer.p"]  # a fast-reid GeneralizedMeanPooling model
    torch.save({"model": state}, tmp_path / "gem.pth")
    model = build_bot(num_classes=4, depth=18, pooling="gem", pretrained=str(tmp_path / "gem.pth"))
    assert float(model.head.pool.p) == 3.0
    assert torch.equal(model.head.bnneck.weight, source.head.bnneck.weight.half().float())
    # eval.py / init_from: strict loading, a fixed GeM's p being no state on either side
    module = ReIDModule(build_bot(num_classes=4, depth=18, pooling="gem"))
    load_model_weights(module, load_model_checkpoint(tmp_path / "gem.pth")["state_dict"], source="gem", strict=True)
    assert float(module.model.head.pool.p) == 3.0


def test_init_from_and_eval_read_a_fastreid_checkpoint_as_module_weights(tmp_path, source_bot):
    path = write_fastreid_checkpoint(source_bot, tmp_path / "model_final.pth")
    ckpt = load_model_checkpoint(path)
    assert ckpt["reid_config"] is None
    module = ReIDModule(build_bot(num_classes=5, depth=18, stem_pool="fastreid"))
    load_model_weights(module, ckpt["state_dict"], source=str(path), strict=True)
    assert_same_weights(module.model, source_bot)


def test_a_file_neither_ours_nor_fastreids_is_named(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=f"{path} is neither a reid_lightning checkpoint .* nor a fast-reid one"):
        load_model_checkpoint(path)


def test_resuming_from_a_fastreid_checkpoint_points_to_init_from(tmp_path, source_bot):
    from reid_lightning.checkpointing.resume import ResumePlan

    path = write_fastreid_checkpoint(source_bot, tmp_path / "model_final.pth")
    cfg = compose_train([f"ckpt_path={path}"], output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=f"{path} is a fast-reid checkpoint.*pass init_from={path}"):
        ResumePlan.from_config(cfg)


def reference_features() -> tuple[list[str], torch.Tensor]:
    saved = np.load(REFERENCE / "features.npz")
    return [str(p) for p in saved["paths"]], torch.from_numpy(saved["features"])


@needs_reference
def test_fastreid_reference_features_are_reproduced(tmp_path):
    cfg = compose_train(["model=bot_r18", f"model.pretrained={REFERENCE / 'model_final.pth'}"], output_dir=tmp_path)
    assert cfg.model.stem_pool == "fastreid"
    model = instantiate(cfg.model, num_classes=16, _convert_="all").eval()
    paths, expected = reference_features()
    transform = build_test_transforms((cfg.data.height, cfg.data.width))
    images = torch.stack([transform(Image.open(MINI_MARKET / p).convert("RGB")) for p in paths])
    with torch.no_grad():
        features = model(images)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


@needs_reference
def test_eval_without_model_says_to_pass_it(tmp_path):
    from test_bad_input import compose_eval

    from reid_lightning.cli.evaluate import evaluate

    cfg = compose_eval([f"ckpt_path={REFERENCE / 'model_final.pth'}", "data=folder"], tmp_path)
    with pytest.raises(ValueError, match=r"holds no saved config \(a fast-reid checkpoint\?\): pass model=\.\.\."):
        evaluate(cfg)


@pytest.mark.slow
@needs_reference
def test_eval_script_evaluates_a_fastreid_checkpoint(tmp_path):
    out = tmp_path / "eval"
    run_script("eval.py", [
        f"ckpt_path={REFERENCE / 'model_final.pth'}", "model=bot_r18", "data=folder", f"paths.data_dir={MINI_MARKET}",
        "trainer=cpu", "data.num_workers=0", "data.persistent_workers=false", "cmc_curve=false",
        "export_features=true", f"hydra.run.dir={out}",
    ], cwd=tmp_path, threads=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
    exported = np.load(out / "features.npz")
    paths, expected = reference_features()
    rows = {p: i for i, p in enumerate(paths)}
    order = [rows[str(Path(p).relative_to(MINI_MARKET))] for p in exported["paths"]]
    assert len(order) == 64  # query + gallery: every test image went through fast-reid's weights
    torch.testing.assert_close(torch.from_numpy(exported["features"]), expected[order], atol=1e-5, rtol=0)


@needs_reference
def test_extract_and_search_take_a_fastreid_checkpoint_with_model(tmp_path):
    from omegaconf import OmegaConf

    from reid_lightning.cli.inference import run_extract, run_search
    from reid_lightning.inference import FeatureExtractor

    ckpt = REFERENCE / "model_final.pth"
    with pytest.raises(ValueError, match=r"fast-reid checkpoint.*no saved config.*model=bot_r50"):
        FeatureExtractor.from_checkpoint(ckpt, device="cpu")
    model_cfg = OmegaConf.to_container(compose_train(["model=bot_r18"]).model)
    extractor = FeatureExtractor.from_checkpoint(ckpt, device="cpu", model=model_cfg)
    assert extractor.size == (256, 128) and extractor.flip is False  # fast-reid's INPUT.SIZE_TEST default
    paths, expected = reference_features()
    torch.testing.assert_close(extractor([MINI_MARKET / p for p in paths[:8]], normalize=False), expected[:8],
                               atol=1e-5, rtol=0)

    # the scripts: model=bot_r18 on the command line (here its config), the index remembers it
    index = run_extract(OmegaConf.create({
        "ckpt_path": str(ckpt), "model": model_cfg, "input_size": None, "input": str(MINI_MARKET / "query"),
        "output": str(tmp_path / "index.npz"), "dtype": "float32", "normalize": False, "flip": None, "device": "cpu",
        "precision": "32", "batch_size": 16, "num_workers": 0, "skip_bad": False, "progress": False,
    }))
    with np.load(index) as saved:
        rows = {p: i for i, p in enumerate(paths)}
        order = [rows[f"query/{name}"] for name in saved["paths"]]
        torch.testing.assert_close(torch.from_numpy(saved["features"]), expected[order], atol=1e-5, rtol=0)
    run_search(OmegaConf.create({
        "index": str(index), "query": str(MINI_MARKET / "query"), "top_k": 1, "metric": "cosine", "backend": "torch",
        "ckpt_path": None, "model": None, "device": "cpu", "batch_size": 16, "num_workers": 0, "skip_bad": False,
        "rank_lists": False, "rank_list_size": 10, "output_dir": str(tmp_path / "search"),
    }))
    results = json.loads((tmp_path / "search" / "results.json").read_text())
    assert all(hits[0][0] == query and hits[0][1] < 1e-5 for query, hits in results.items())  # each finds itself
