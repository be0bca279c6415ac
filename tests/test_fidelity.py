"""The ``fidelity`` metric plugin (memobench_plugins.fidelity): FID/KID through torch-fidelity (METHODS §5.2).

* SSCD features (offline default, ids ``fd_sscd``/``kd_sscd``) on real photographs from scikit-image: identical sets
  give FD ≈ 0, other crops of the same photos a small FD, other photos a large one.
* The Inception code path (ids ``fid``/``kid``, ``feature_extractor_weights_path``) is run with a tiny random conv net
  registered with torch-fidelity under a test name, and checked against a direct ``torch_fidelity.calculate_metrics``.
* The reference-feature cache (.npz, no pickle) is hit on the second call; no image files or temp folders are written.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import memobench_plugins.fidelity as fid
import numpy as np
import pluggy
import pytest
from PIL import Image

from memobench import hookspecs
from memobench.api import Context, Prompt, Sample
from memobench.api import file_sha256, image_sha256

TINY = "memobench-test-tinynet"


# ---------------------------------------------------------------------------------------------- helpers
def _photos() -> dict[str, np.ndarray]:
    import skimage.data as d

    return {"astronaut": d.astronaut(), "coffee": d.coffee(), "chelsea": d.chelsea(), "rocket": d.rocket()}


def _crops(img: np.ndarray, n: int, rng: np.random.Generator, size: int = 160) -> list[np.ndarray]:
    """Random square crops, half of them mirrored."""
    out = []
    h, w = img.shape[:2]
    for _ in range(n):
        y, x = rng.integers(0, h - size), rng.integers(0, w - size)
        c = img[y:y + size, x:x + size]
        out.append(np.ascontiguousarray(c[:, ::-1] if rng.random() < 0.5 else c))
    return out


@pytest.fixture(scope="module")
def photo_sets():
    rng = np.random.default_rng(0)
    p = _photos()
    a = _crops(p["astronaut"], 4, rng) + _crops(p["coffee"], 4, rng)
    a2 = _crops(p["astronaut"], 4, rng) + _crops(p["coffee"], 4, rng)  # other crops of the same photos
    b = _crops(p["chelsea"], 4, rng) + _crops(p["rocket"], 4, rng)  # other photos
    return {"A": a, "A2": a2, "B": b}


def _samples(gens: list[np.ndarray], refs: list[np.ndarray], every: bool = False) -> list[Sample]:
    """Utility samples: one per generated image; references on the first sample (or repeated on every one)."""
    return [Sample(sample_key=f"key{i:03d}", prompt=Prompt(id=f"p{i}", text=f"caption {i}"), seed=0, image=g,
                   references=list(refs) if (every or i == 0) else [], role="utility")
            for i, g in enumerate(gens)]


def _ctx(tmp_path: Path) -> Context:
    return Context(cache_dir=tmp_path / "cache", offline=True)


# ---------------------------------------------------------------------------------------------- tiny extractor
def _tiny_classes():
    import torch
    import torch.nn.functional as F
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyNet(FeatureExtractorBase):
        """A small random conv net standing in for Inception-v3: weights from feature_extractor_weights_path."""

        n_images = 0  # images seen by forward (all instances)

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)
            assert feature_extractor_weights_path, "the tiny extractor needs its weights file"
            from safetensors.torch import load_file

            self.load_state_dict(load_file(feature_extractor_weights_path))

        @staticmethod
        def get_provided_features_list():
            return ("16",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "16"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
            TinyNet.n_images += x.shape[0]  # on the base class (torch-fidelity runs a memo subclass)
            h = F.interpolate(x.float() / 127.5 - 1.0, size=(64, 64), mode="bilinear", align_corners=False)
            h = F.relu(self.conv2(F.relu(self.conv1(h))))
            return (h.mean(dim=(2, 3)),)

    if TINY not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY, TinyNet)
    return FEATURE_EXTRACTORS_REGISTRY[TINY]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    _tiny_classes()
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"conv1": torch.nn.Conv2d(3, 8, 3, stride=2),
                               "conv2": torch.nn.Conv2d(8, 16, 3, stride=2)})
    path = tmp_path_factory.mktemp("tiny-extractor") / "tinynet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


class InceptionLike(fid.Fidelity):
    """The plugin with the tiny extractor in Inception's place (same code path: weights_path, ids fid/kid)."""

    inception_name = TINY


# ---------------------------------------------------------------------------------------------- registration
def test_plugin_registers_fidelity():
    pm = pluggy.PluginManager("memobench")
    pm.add_hookspecs(hookspecs)
    pm.register(fid, name="fidelity")
    got = []
    pm.hook.register_metrics(register=got.append)
    assert [c.name for c in got] == ["fidelity"]
    cls = got[0]
    assert cls.roles == ("utility",) and cls.info.higher_is_better is False and "METHODS §5.2" in cls.__doc__
    p = cls.Params()
    assert (p.feature_extractor, p.weights_path, p.reference_dir, p.kid_subsets, p.kid_subset_size) == \
        ("auto", "", "", 100, 1000)
    assert cls.make_params({"kid_subsets": "10"}).kid_subsets == 10


def test_plugin_import_is_torch_free():
    code = "import sys, memobench_plugins.fidelity; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metric_ids_never_fid_without_inception():
    assert fid.metric_ids("inception-v3-compat") == ("fid", "kid")
    assert fid.metric_ids("sscd") == fid.metric_ids("memobench-sscd") == ("fd_sscd", "kd_sscd")
    assert fid.metric_ids("dinov2-vit-l-14") == ("fd_dinov2_vit_l_14", "kd_dinov2_vit_l_14")


# ---------------------------------------------------------------------------------------------- SSCD (offline)
SSCD_FE = fid.Fidelity.Params(feature_extractor="sscd")  # fd_sscd only when asked for (issue 25)


def test_sscd_identical_sets_fd_zero_and_named_fd_sscd(tmp_path, photo_sets):
    a = photo_sets["A"]
    out = fid.Fidelity(SSCD_FE).compute(_samples(a, a), _ctx(tmp_path))
    assert set(out) == {"fd_sscd", "kd_sscd"}  # SSCD features: never "fid"
    fd, kd = out["fd_sscd"], out["kd_sscd"]
    assert fd.unavailable is None and abs(fd.value) < 1e-3
    assert (fd.display_name, kd.display_name) == ("FD (SSCD features)", "KD (SSCD features)")  # never "FID"
    impl = fd.impl
    assert impl["library"].startswith("torch-fidelity 0.")
    assert impl["feature_extractor"].startswith("sscd (memobench-sscd: sscd_disc_mixup")
    assert impl["torch_fidelity_extractor"] == "memobench-memo+memobench-sscd"
    assert len(impl["weights_sha256"]) == 64 and impl["requested_feature_extractor"] == "sscd"
    assert (impl["n_gen"], impl["n_ref"], impl["kid_subsets"], impl["kid_subset_size"]) == (8, 8, 100, 8)
    assert "2048" in impl["warning"] and "KID subset size reduced" in impl["warning"]
    assert kd.dispersion["kind"] == "std" and kd.impl == impl


def test_sscd_disjoint_photos_large(tmp_path, photo_sets):
    m, ctx = fid.Fidelity(fid.Fidelity.Params(image_size=160, feature_extractor="sscd")), _ctx(tmp_path)
    a, a2, b = photo_sets["A"], photo_sets["A2"], photo_sets["B"]
    same = m.compute(_samples(a, a2, every=True), ctx)  # references repeated on every sample: deduplicated
    other = m.compute(_samples(a, b), ctx)
    assert same["fd_sscd"].impl["n_ref"] == 8 and same["fd_sscd"].impl["reference"]["n_listed"] == 64
    fd_same, fd_other = same["fd_sscd"].value, other["fd_sscd"].value
    assert fd_other > 0.5 and fd_other > 2 * fd_same > 0
    assert other["kd_sscd"].value > same["kd_sscd"].value


def test_inception_unavailable_offline_and_auto_falls_back(tmp_path, photo_sets):
    a = photo_sets["A"][:3]
    out = fid.Fidelity(fid.Fidelity.Params(feature_extractor="inception-v3-compat")).compute(_samples(a, a),
                                                                                           _ctx(tmp_path))
    assert set(out) == {"fid", "kid"}
    for v in out.values():
        assert v.value is None and "weights_path" in v.unavailable
    out = fid.Fidelity(fid.Fidelity.Params(weights_path=str(tmp_path / "missing.pth"))).compute(
        _samples(a, a), _ctx(tmp_path))
    assert out["fid"].value is None and "does not exist" in out["fid"].unavailable


def test_too_few_images_or_no_references_unavailable(tmp_path, photo_sets):
    a = photo_sets["A"]
    out = fid.Fidelity(SSCD_FE).compute(_samples(a[:1], a), _ctx(tmp_path))
    assert set(out) == {"fd_sscd", "kd_sscd"}
    assert all(v.value is None and "n_gen=1" in v.unavailable for v in out.values())
    out = fid.Fidelity(SSCD_FE).compute(_samples(a, []), _ctx(tmp_path))
    assert all(v.value is None and "no reference images" in v.unavailable for v in out.values())


# ---------------------------------------------------------------------------------------------- Inception path
def test_inception_code_path_with_tiny_registered_extractor(tmp_path, photo_sets, tiny_weights):
    import torch
    import torch_fidelity

    a, b = photo_sets["A"], photo_sets["B"]
    m = InceptionLike(InceptionLike.Params(weights_path=str(tiny_weights), image_size=64))
    out = m.compute(_samples(a, b), _ctx(tmp_path))
    assert set(out) == {"fid", "kid"}
    f, k = out["fid"], out["kid"]
    assert f.unavailable is None and f.value > 0
    assert f.impl["feature_extractor"] == TINY and f.impl["torch_fidelity_extractor"] == f"memobench-memo+{TINY}"
    assert f.impl["weights_sha256"] == file_sha256(tiny_weights) and f.impl["weights_origin"] == "weights_path"

    # the same number from torch-fidelity directly (no plugin, no memo) on the same uint8 CHW tensors
    from memobench_plugins.fidelity._torch import square_resize

    class DS(torch.utils.data.Dataset):
        def __init__(self, ims):
            self.t = [torch.from_numpy(square_resize(im, 64).copy()).permute(2, 0, 1).contiguous() for im in ims]

        def __len__(self):
            return len(self.t)

        def __getitem__(self, i):
            return self.t[i]

    refs = [b[i] for i in np.argsort([image_sha256(x) for x in b])]  # the plugin orders references by digest
    direct = torch_fidelity.calculate_metrics(
        input1=DS(a), input2=DS(refs), fid=True, kid=True, feature_extractor=TINY,
        feature_extractor_weights_path=str(tiny_weights), kid_subsets=100, kid_subset_size=8, cuda=False,
        cache=False, save_cpu_ram=True, verbose=False)
    assert f.value == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-6, abs=1e-9)
    assert k.value == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-6, abs=1e-12)
    assert k.dispersion["value"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_STD], rel=1e-6, abs=1e-12)

    same = m.compute(_samples(a, a), _ctx(tmp_path))
    assert abs(same["fid"].value) < 1e-3

    no_w = InceptionLike(InceptionLike.Params(feature_extractor=TINY)).compute(_samples(a, b), _ctx(tmp_path))
    assert no_w["fid"].value is None and "weights_path" in no_w["fid"].unavailable


def test_reference_cache_hit_and_no_image_files_written(tmp_path, photo_sets, tiny_weights, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the fidelity metric must not write image files or temp folders")

    monkeypatch.setattr(Image.Image, "save", refuse)
    for fn in ("mkdtemp", "TemporaryDirectory", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, fn, refuse)

    tiny = _tiny_classes()
    a, b = photo_sets["A"], photo_sets["B"]
    ctx = _ctx(tmp_path)
    m = InceptionLike(InceptionLike.Params(weights_path=str(tiny_weights), image_size=64))
    n0 = tiny.n_images
    first = m.compute(_samples(a, b), ctx)["fid"]
    assert first.impl["reference_cache"] == "miss" and first.impl["n_ref_extracted"] == 8
    assert tiny.n_images - n0 == 16
    n1 = tiny.n_images
    second = m.compute(_samples(a, b), ctx)["fid"]
    assert second.impl["reference_cache"] == "hit" and second.impl["n_ref_extracted"] == 0
    assert tiny.n_images - n1 == 8  # only the generated images went through the extractor
    assert second.value == first.value and second.impl["reference_sha256"] == first.impl["reference_sha256"]

    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert files == [Path(first.impl["reference_cache_path"])]
    assert files[0].parent == ctx.cache_dir / "fidelity" and files[0].suffix == ".npz"
    with np.load(files[0], allow_pickle=False) as z:
        assert z["features_0"].shape == (8, 16) and z["keys"].shape == (8,)
        assert z["mu"].shape == (16,) and z["sigma"].shape == (16, 16)

    # other references (or another extractor identity) -> another key
    third = m.compute(_samples(a, b[:7]), ctx)["fid"]
    assert third.impl["reference_cache"] == "miss" and third.impl["reference_sha256"] != first.impl["reference_sha256"]


def test_reference_dir_equals_in_memory_references(tmp_path, photo_sets, tiny_weights):
    a, b = photo_sets["A"], photo_sets["B"][:4]
    ref_dir = tmp_path / "real"
    ref_dir.mkdir()
    for i, im in enumerate(b):  # test fixture: a folder of real images (lossless PNG)
        Image.fromarray(im).save(ref_dir / f"{i}.png")
    Image.fromarray(b[0]).save(ref_dir / "dup.png")  # same bytes as 0.png: deduplicated
    (ref_dir / "notes.txt").write_text("not an image")
    ctx = _ctx(tmp_path)
    by_dir = InceptionLike(InceptionLike.Params(weights_path=str(tiny_weights), image_size=64,
                                                reference_dir=str(ref_dir))).compute(_samples(a, []), ctx)["fid"]
    assert by_dir.impl["n_ref"] == 4 and by_dir.impl["reference"]["source"] == "reference_dir"
    in_mem = InceptionLike(InceptionLike.Params(weights_path=str(tiny_weights), image_size=64)).compute(
        _samples(a, b), ctx)["fid"]
    # same pixels, different order (file hash vs image digest): FID is order-free
    assert by_dir.value == pytest.approx(in_mem.value, rel=1e-5)


def test_display_names_say_which_features():
    from memobench_plugins.fidelity import display_names, metric_ids

    assert display_names(metric_ids("sscd"), "sscd") == ("FD (SSCD features)", "KD (SSCD features)")
    assert display_names(("fid", "kid"), "inception-v3-compat") == ("FID", "KID")
    assert display_names(("fd_clip", "kd_clip"), "clip-vit-b-32") == ("FD (clip-vit-b-32 features)",
                                                                      "KD (clip-vit-b-32 features)")
