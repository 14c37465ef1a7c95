"""DINOv2-style ViT memory backbones (``timm:<arch>:<file>``) on a tiny random ViT saved to a file in the test:
loaded offline from that file, patch grids for square and non-square frames and tiles, fit + predict through the
Detector, a registration over real HTTP, ``clipshot info``'s facts, and one-line errors for bad weights.

Random weights: these check structure, never accuracy."""

from __future__ import annotations

import hashlib
import io
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app.cli.main import main
from clipshot.backbone import BackboneLoadError, BackboneSpecError, load_backbone
from clipshot.detector import Detector
from clipshot.geometry import Geometry
from tests.helpers.geometry import HEIGHT, WIDTH, wide_png
from tests.helpers.vit import tiny_vit_spec, tiny_vit_weights

pytest.importorskip("timm")

PATCH = 14  # the tiny config's patch size, as DINOv2's


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_vit_weights(tmp_path_factory.mktemp("vit") / "tiny.safetensors")


@pytest.fixture(scope="module")
def backbone(weights):
    return load_backbone(tiny_vit_spec(weights))


def wide(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(wide_png(seed))).convert("RGB")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_loads_the_file_without_the_network(weights, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network use while loading local weights: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    backbone = load_backbone(tiny_vit_spec(weights))
    assert backbone.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()  # what sha256sum prints
    assert not backbone.supports_text and backbone.frame_multiple == PATCH
    assert backbone.image_size == 56 and backbone.layers == (2, 4) and backbone.grid == (4, 4)
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    loaded = backbone.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    seeded = load_backbone("timm:clipshot-tiny-vit:random")  # timm's init from another seed: other features
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(seeded.extract(pixels).patches[0], backbone.extract(pixels).patches[0])


@pytest.mark.parametrize("frame", [(56, 56), (42, 98), (98, 28)])
def test_patch_grid_follows_the_frame_and_matches_timm(backbone, frame):
    """Any frame of patch multiples: the grid is frame / 14, each tapped block's tokens are unit vectors, and they
    equal timm's own dynamic-size forward (its position resampling, the final norm) on the same weights."""
    pixels = torch.randn(2, 3, *frame, generator=torch.Generator().manual_seed(1))
    feats = backbone.extract(pixels)
    grid = (frame[0] // PATCH, frame[1] // PATCH)
    assert feats.cls is None and feats.grid == grid and len(feats.patches) == 2
    for patches in feats.patches:
        assert patches.shape == (2, grid[0] * grid[1], 32)
        assert torch.allclose(patches.norm(dim=-1), torch.ones(2, grid[0] * grid[1]), atol=1e-5)
    from clipshot.backbone.vit import build_vit

    reference = build_vit(backbone.config)
    reference.load_state_dict(backbone.model.state_dict())
    with torch.no_grad():
        maps = reference.eval().forward_intermediates(pixels, indices=[1, 3], norm=True, output_fmt="NCHW",
                                                      intermediates_only=True)
    for got, want in zip(feats.patches, maps, strict=True):
        # 1e-6: the same fp32 ops in the same order; only the cached position table is computed separately
        assert (got - F.normalize(want.flatten(2).transpose(1, 2), dim=-1)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone.extract(torch.zeros(1, 3, 56, 60))


def test_image_size_must_be_a_patch_multiple(weights):
    with pytest.raises(ValueError, match="multiple of its patch size 14"):
        load_backbone(tiny_vit_spec(weights), image_size=64)
    assert load_backbone(tiny_vit_spec(weights), image_size=84).grid == (6, 6)


@pytest.mark.parametrize("geometry", [
    None, Geometry(resize="native", frame=(42, 112)), Geometry(tiles=(1, 3), tile_size=(1.0, 0.4)),
], ids=["auto", "native", "tiles"])
def test_detector_fits_and_predicts_on_every_geometry(backbone, geometry):
    detector = Detector(backbone)
    shots = [wide(seed) for seed in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few shots
        adapter = detector.fit_memory(shots, category="strip", geometry=geometry)
    frame, views = adapter.geometry.frame, adapter.geometry.views_per_image
    assert frame[0] % PATCH == 0 and frame[1] % PATCH == 0 and adapter.text is None
    assert adapter.backbone["spec"] == backbone.spec and adapter.backbone["layers"] == [2, 4]
    pixels = backbone.preprocess(shots[:2], adapter.geometry)
    assert pixels.shape == (2 * views, 3, *frame)
    feats = detector.features(pixels, adapter)
    assert feats.grid == (frame[0] // PATCH, frame[1] // PATCH)
    scores, maps = detector.forward(pixels.reshape(2, views, 3, *frame), adapter)
    assert scores.shape == (2,) and maps.shape == (2, views * frame[0], frame[1])
    predictions = detector.predict([wide(9)], adapter)
    assert predictions[0].anomaly_map.shape == (HEIGHT, WIDTH) and np.isfinite(predictions[0].score)


def test_registration_over_http_loads_the_file_named_in_the_settings(weights, tmp_path):
    """The service builds the backbone from CLIPSHOT_BACKBONE itself (no backbone handed in), registers a product
    from uploaded shots over a real socket, serves it, and the bundle records the file's sha256."""
    from app.client import Client
    from app.core.config import Settings
    from tests.helpers.decisions import manifest
    from tests.threaded_server import threaded_server

    settings = Settings(_env_file=None, backbone=tiny_vit_spec(weights), device="cpu", store=tmp_path,
                        admin_keys=["admin-key"], client_keys=["client-key"])
    with threaded_server(settings) as url:
        with Client(url, "admin-key") as admin:
            admin.register("strip", [wide_png(seed) for seed in range(4)], finetune=False)
        with Client(url, "client-key") as client:
            result = client.predict("strip", [wide_png(9)])
    assert len(result.predictions) == 1 and np.isfinite(result.predictions[0].score)
    recorded = manifest(tmp_path, "strip", 1)["backbone"]
    assert recorded["spec"] == tiny_vit_spec(weights)
    assert recorded["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_info_prints_the_facts_to_check_a_file_by(weights, capsys):
    assert main(["info", "--backbone", tiny_vit_spec(weights)]) == 0
    out = capsys.readouterr().out
    assert f"weights sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()}" in out
    assert f"weights file:  {weights.resolve()}" in out
    assert "image size:    56" in out and "layers:        [2, 4]" in out and "frame multiple 14" in out
    assert "memory only" in out


def test_official_dinov2_checkpoint_layout_loads(weights, tmp_path):
    """Meta's release (.pth) carries a ``mask_token`` timm's model lacks; timm's checkpoint filter drops it, so the
    official file and timm's hub file of the same weights give the same features."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    official = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save({**state, "mask_token": torch.zeros(1, 32)}, official)
    pixels = torch.randn(1, 3, 56, 84, generator=torch.Generator().manual_seed(2))
    got = load_backbone(tiny_vit_spec(official)).extract(pixels)
    want = load_backbone(tiny_vit_spec(weights)).extract(pixels)
    assert all(torch.equal(g, w) for g, w in zip(got.patches, want.patches, strict=True))


def test_bad_weights_are_one_line_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["info", "--backbone", tiny_vit_spec(missing)]) == 2
    line = one_line(capsys)
    assert str(missing) in line and "does not exist" in line and "never downloads" in line

    assert main(["info", "--backbone", tiny_vit_spec(tmp_path)]) == 2
    assert "is a directory" in one_line(capsys)

    wider = tiny_vit_weights(tmp_path / "wider.safetensors", embed_dim=48, num_heads=2)  # another architecture
    assert main(["info", "--backbone", tiny_vit_spec(wider)]) == 2
    line = one_line(capsys)
    assert str(wider) in line and "another architecture" in line and "size mismatch" in line

    garbage = tmp_path / "cut.safetensors"
    garbage.write_bytes(b"\x00" * 3000)  # a truncated copy
    assert main(["info", "--backbone", tiny_vit_spec(garbage)]) == 2
    line = one_line(capsys)
    assert str(garbage) in line and "corrupt or truncated" in line

    assert main(["info", "--backbone", "timm:vit_small_patch14_dinov2:lvd142m"]) == 2  # a hub tag: never fetched
    assert "not a file path" in one_line(capsys)

    assert main(["info", "--backbone", f"timm:vit_smal_patch14_dinov2:{missing}"]) == 2
    assert "did you mean vit_small_patch14_dinov2" in one_line(capsys)


def test_spec_without_weights_and_clip_only_options_are_refused(weights):
    with pytest.raises(BackboneSpecError, match="local weights file"):
        load_backbone("timm:clipshot-tiny-vit")
    with pytest.raises(ValueError, match="without a CLIP head"):
        load_backbone(tiny_vit_spec(weights), dpam_layers=[3])
    with pytest.raises(ValueError, match="1-based block indices in 1..4"):
        load_backbone(tiny_vit_spec(weights), layers=[5])
    with pytest.raises(ValueError, match="DPAM needs a CLIP backbone"):
        load_backbone(tiny_vit_spec(weights)).extract(torch.zeros(1, 3, 56, 56), dpam=True)
    with pytest.raises(BackboneLoadError, match="known: "):
        load_backbone("timm:resnet50:/x.safetensors")
