"""Issue 25, defects 1 (pins of non-diffusers weights), 2 (SSCD model and device) and 3 (FID on COCO from the CLI).

Every download goes to a local HTTP server on 127.0.0.1 serving files generated here (a tiny scripted model standing
in for Meta's SSCD TorchScript file, tiny extractor weights standing in for torch-fidelity's Inception, generated
JPEGs standing in for COCO images, a small annotations zip): no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import memobench.sscd as sscd
from memobench.api import Context, Prompt, Sample
from memobench.data import (COCO_IDS_FILE, COCO_MANIFEST, PinMismatchError, coco_file_name,
                            coco_ids_from_annotations, id_list_sha256)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEMO_COCO = DATA / "nemo_localizing_memorization" / "coco2014_val_10000.csv"
TINY_FE = "memobench-test-issue25-tinynet"


# ---------------------------------------------------------------------------------------------- local server
class _Server:
    """Serves ``files`` ({url path: bytes}) on 127.0.0.1; ``hits`` counts GET requests per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: Counter = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                owner.hits[self.path] += 1
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    try:
        yield s
    finally:
        s.close()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _scripted_sscd_bytes(tmp_path: Path) -> bytes:
    """A tiny TorchScript model (per-channel mean of the normalised input) standing in for Meta's file."""
    torch = pytest.importorskip("torch")

    class ChannelMean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    p = tmp_path / "scripted.pt"
    torch.jit.script(ChannelMean()).save(str(p))
    return p.read_bytes()


def _one_line_pin_error(msg: str, expected: str, got: str) -> None:
    assert "\n" not in msg and f"sha256 {got}" in msg and f"expected {expected}" in msg and "pin" in msg


# ====================================================================================== defect 1: pins
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sscd_torchscript_download_pinned_recorded_and_refused(tmp_path, server, monkeypatch):
    body = _scripted_sscd_bytes(tmp_path)
    server.files["/sscd_disc_large.torchscript.pt"] = body
    monkeypatch.setattr(sscd, "OFFICIAL_URL", server.url + "/{name}.torchscript.pt")
    cache = tmp_path / "cache"
    img = [np.zeros((300, 300, 3), np.uint8)]

    wrong = "0" * 64
    m = sscd.SSCD("wen2024", backend="torchscript", cache_dir=cache, offline=False, sha256=wrong)
    with pytest.raises(PinMismatchError) as e:
        m.embed(img)
    _one_line_pin_error(str(e.value), wrong, _sha(body))
    assert "sscd_disc_large.torchscript.pt" in str(e.value)
    assert not (cache / "sscd" / "sscd_disc_large.torchscript.pt").exists()  # a refused download is not kept

    m = sscd.SSCD("wen2024", backend="torchscript", cache_dir=cache, offline=False)
    m.embed(img)
    assert m.impl["weights_sha256"] == _sha(body) and m.impl["weights_pin"] == "sha256 recorded at this download"
    record = cache / "sscd" / "sscd_disc_large.torchscript.pt.sha256"
    assert record.read_text().strip() == _sha(body)
    assert server.hits["/sscd_disc_large.torchscript.pt"] == 2

    # the cached file is checked against the recorded sha256 before torch.jit.load
    cached = cache / "sscd" / "sscd_disc_large.torchscript.pt"
    cached.write_bytes(body + b"tampered")
    with pytest.raises(PinMismatchError) as e:
        sscd.SSCD("wen2024", backend="torchscript", cache_dir=cache, offline=True).embed(img)
    assert "\n" not in str(e.value) and "recorded" in str(e.value) and str(cached) in str(e.value)


def _tiny_extractor():
    import torch
    import torch.nn.functional as F
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyNet(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
            from safetensors.torch import load_file

            self.load_state_dict(load_file(feature_extractor_weights_path))

        @staticmethod
        def get_provided_features_list():
            return ("8",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "8"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            h = F.interpolate(x.float() / 127.5 - 1.0, size=(32, 32), mode="bilinear", align_corners=False)
            return (F.relu(self.conv(h)).mean(dim=(2, 3)),)

    if TINY_FE not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY_FE, TinyNet)


def _tiny_weights_bytes(tmp_path: Path) -> bytes:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, stride=2)
    p = tmp_path / "tiny.safetensors"
    save_file({f"conv.{k}": v.contiguous() for k, v in conv.state_dict().items()}, str(p))
    return p.read_bytes()


def _fid_samples(n: int = 4) -> list[Sample]:
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(n)]
    return [Sample(sample_key=f"k{i}", prompt=Prompt(id=str(i), text=f"c {i}"), seed=0,
                   image=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), references=refs if i == 0 else [],
                   role="utility") for i in range(n)]


def _inception_like(server_url: str):
    import memobench_plugins.fidelity as fid

    class InceptionLike(fid.Fidelity):
        """The plugin with a tiny extractor in Inception's place, its weights "downloaded" from 127.0.0.1."""

        inception_name = TINY_FE
        inception_url = server_url + "/tiny.safetensors"
        inception_file = "tiny.safetensors"

    return InceptionLike


def test_inception_weights_downloaded_hash_checked_and_recorded(tmp_path, server):
    _tiny_extractor()
    body = _tiny_weights_bytes(tmp_path)
    server.files["/tiny.safetensors"] = body
    cls = _inception_like(server.url)
    ctx = Context(cache_dir=tmp_path / "cache", offline=False)

    wrong = "f" * 64
    with pytest.raises(PinMismatchError) as e:
        cls(cls.Params(inception_sha256=wrong, image_size=32)).compute(_fid_samples(), ctx)
    _one_line_pin_error(str(e.value), wrong, _sha(body))

    out = cls(cls.Params(image_size=32)).compute(_fid_samples(), ctx)  # auto = Inception (here: its stand-in)
    assert set(out) == {"fid", "kid"} and out["fid"].unavailable is None and out["fid"].value is not None
    impl = out["fid"].impl
    assert impl["weights_sha256"] == _sha(body) and impl["weights_origin"].startswith("memobench download")
    assert impl["weights_pin"] == "sha256 recorded at this download"
    assert server.hits["/tiny.safetensors"] == 2
    again = cls(cls.Params(image_size=32)).compute(_fid_samples(), Context(cache_dir=tmp_path / "cache",
                                                                           offline=True))
    assert again["fid"].value == out["fid"].value and server.hits["/tiny.safetensors"] == 2  # cached, verified
    assert again["fid"].impl["weights_pin"] == "sha256 recorded at download"


def test_clip_weights_sha256_pin_refused(tmp_path):
    import memobench_plugins.clip_score as cs

    w = tmp_path / "clip.safetensors"
    w.write_bytes(b"not really weights")
    wrong = "a" * 64
    m = cs.ClipScore(cs.ClipScore.Params(weights_path=str(w), weights_sha256=wrong, revision=""))
    with pytest.raises(PinMismatchError) as e:  # refused before open_clip loads anything
        m.compute(_fid_samples(2), Context(cache_dir=tmp_path, offline=True))
    _one_line_pin_error(str(e.value), wrong, _sha(w.read_bytes()))


def test_t2icompbench_backend_revision_and_sha256_pins(tmp_path):
    from memobench_plugins.t2icompbench import backends as be

    assert be.split_source("Salesforce/blip-vqa-capfilt-large@0123abc") == ("Salesforce/blip-vqa-capfilt-large",
                                                                           "0123abc")
    assert be.split_source("Intel/dpt-hybrid-midas") == ("Intel/dpt-hybrid-midas", None)
    folder = tmp_path / "local@model"  # a local folder keeps its '@'
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    assert be.split_source(str(folder)) == (str(folder), None)
    rec = be.weights_record(str(folder), weights_sha256=_sha(b"weights"))
    assert rec["weights_sha256"] == {"model.safetensors": _sha(b"weights")} and rec["weights_pin"] == _sha(b"weights")
    with pytest.raises(PinMismatchError) as e:
        be.weights_record(str(folder), weights_sha256="b" * 64)
    assert "\n" not in str(e.value) and "b" * 64 in str(e.value) and _sha(b"weights") in str(e.value)


# ====================================================================================== defect 2: SSCD model
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_auto_uses_official_torchscript_for_disc_large_preset(tmp_path, server, monkeypatch):
    import memobench_plugins.memorization as mem

    server.files["/sscd_disc_large.torchscript.pt"] = _scripted_sscd_bytes(tmp_path)
    monkeypatch.setattr(sscd, "OFFICIAL_URL", server.url + "/{name}.torchscript.pt")
    m = mem.SSCDOrig(mem.SSCDOrig.Params(preset="wen2024"))
    emb = m.make_embedder(Context(cache_dir=tmp_path / "cache", offline=False, device="cpu"))
    impl = emb.impl
    assert impl["backend"] == "torchscript" and impl["checkpoint"] == "sscd_disc_large (torchscript, official file)"
    assert impl["substitution"] is None and impl["device"] == "cpu"

    # the download failing: auto falls back to the offline model and says so
    server.files.clear()
    emb = m.make_embedder(Context(cache_dir=tmp_path / "other", offline=False, device="cpu"))
    assert emb.impl["backend"] == "onnx"
    assert "sscd_disc_large" in emb.impl["substitution"] and "download" in emb.impl["substitution"]


def test_sscd_embedder_runs_on_the_runs_device_or_says_why_not(tmp_path):
    import memobench_plugins.memorization as mem

    m = mem.MemorizationRate(mem.MemorizationRate.Params())
    emb = m.make_embedder(Context(cache_dir=tmp_path, offline=True, device="cuda:0"))
    assert emb.device == "cuda:0"  # the run's device reaches the embedder
    # offline, nothing cached: the ONNX model runs on CPU, and the summary says so
    assert emb.impl["backend"] == "onnx" and emb.impl["device"] == "cpu"
    assert "instead of the run's device cuda:0" in emb.impl["substitution"]
    # offline default on CPU (the embedded model's scoring): the same ONNX disc_mixup, nothing substituted
    emb = m.make_embedder(Context(cache_dir=tmp_path, offline=True, device="cpu"))
    assert emb.impl["backend"] == "onnx" and emb.impl["substitution"] is None
    assert emb.impl["checkpoint"].startswith("sscd_disc_mixup (int8 onnx")


def test_summary_table_prints_substitutions(capsys):
    from memobench.cli import _print_summary

    sub = ("preset wen2024 specifies sscd_disc_large; the onnx backend ran sscd_disc_mixup instead (not the same "
           "model: numbers are not comparable with the paper's)")
    metric = {"value": 0.5, "n": 2, "higher_is_better": False, "dispersion": None,
              "impl": {"name": "sscd", "checkpoint": "sscd_disc_mixup", "preset": "wen2024", "substitution": sub}}
    result = {"model": {"plugin": {"name": "tiny"}}, "mitigation": {"name": "none"}, "attack": {"name": "none"},
              "status": "complete", "metrics": {"mr": metric, "sscd_orig": dict(metric)}}
    out = SimpleNamespace(result=result, result_path="r.json", samples_path="s.parquet", grid_path=None)
    capsys.readouterr()
    _print_summary(out)
    text = capsys.readouterr().out
    assert f"substitution (mr, sscd_orig): {sub}" in text


# ====================================================================================== defect 3: FID on COCO
def test_fid_auto_never_switches_to_sscd_features(tmp_path):
    import memobench_plugins.fidelity as fid

    out = fid.Fidelity().compute(_fid_samples(), Context(cache_dir=tmp_path, offline=True))
    assert set(out) == {"fid", "kid"}  # no fd_sscd unless asked for
    for v in out.values():
        assert v.value is None and "Inception" in v.unavailable and "weights_path" in v.unavailable
    asked = fid.Fidelity(fid.Fidelity.Params(feature_extractor="sscd", image_size=64)).compute(
        _fid_samples(), Context(cache_dir=tmp_path, offline=True))
    assert set(asked) == {"fd_sscd", "kd_sscd"} and asked["fd_sscd"].value is not None


def test_run_metric_param_option(cli_inproc, tmp_path):
    base = ["run", "--offline", "--dry-run", "--limit", "1", "--seeds", "0", "--metric", "mr",
            "--cache-dir", tmp_path / "c", "-o", tmp_path / "o"]
    rc, out, err = cli_inproc(base)
    assert rc == 0, err
    plain = json.loads(out)["config_hash"]
    rc, out, err = cli_inproc(base + ["--metric-param", "mr.preset=wen2024"])
    assert rc == 0, err
    assert json.loads(out)["config_hash"] != plain  # the parameter reached the metric
    for bad, words in ((["--metric-param", "mr"], "expected METRIC.KEY=VALUE"),
                       (["--metric-param", "nosuch.k=1"], "unknown metric 'nosuch'"),
                       (["--metric-param", "mr.nokey=1"], "no parameter nokey")):
        rc, out, err = cli_inproc(base + bad)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_data_fetch_coco_success_resume_and_pin_refusal(cli_inproc, tmp_path, server):
    ids = [42, 73, 74, 133]
    for i in ids:
        server.files[f"/val2014/{coco_file_name(i)}"] = _jpeg(i)
    (tmp_path / "ids.txt").write_text("# test list\n" + "\n".join(map(str, ids)) + "\n")
    out = tmp_path / "coco"
    args = ["data", "fetch", "coco", "--ids", tmp_path / "ids.txt", "--base-url", server.url + "/val2014",
            "--out", out, "--no-progress", "--cache-dir", tmp_path / "c"]
    rc, so, se = cli_inproc(args)
    assert rc == 0, se
    for i in ids:
        assert (out / coco_file_name(i)).read_bytes() == server.files[f"/val2014/{coco_file_name(i)}"]
    man = json.loads((out / COCO_MANIFEST).read_text())
    assert man["ids_sha256"] == id_list_sha256(ids) and man["ids_source"]["kind"] == "user list (--ids)"
    assert man["files"] == {coco_file_name(i): _sha(_jpeg(i)) for i in ids} and man["failed"] == {}
    assert (out / COCO_IDS_FILE).read_text() == "".join(f"{i}\n" for i in ids)
    assert id_list_sha256(ids) in so and "fidelity.reference_dir=" in so
    assert sorted(p.name for p in out.iterdir()) == sorted([COCO_IDS_FILE, COCO_MANIFEST] +
                                                           [coco_file_name(i) for i in ids])  # no temp files left

    # resume: only the missing file is requested again
    (out / coco_file_name(73)).unlink()
    before = Counter(server.hits)
    rc, so, se = cli_inproc(args)
    assert rc == 0, se
    assert server.hits - before == Counter({f"/val2014/{coco_file_name(73)}": 1})
    assert "3 already there, 1 downloaded" in so

    # a download whose sha256 differs from a pin is refused with one line, and not written
    (out / coco_file_name(133)).unlink()
    wrong = "c" * 64
    (tmp_path / "pins.sha256").write_text(f"{wrong}  {coco_file_name(133)}\n")
    rc, so, se = cli_inproc(args + ["--sha256-file", tmp_path / "pins.sha256"])
    assert rc == 2 and se.startswith("error: ") and se.count("\n") == 1, se
    assert coco_file_name(133) in se and wrong in se and _sha(_jpeg(133)) in se and "--base-url" in se
    assert not (out / coco_file_name(133)).exists()
    # a server that now sends other bytes than the first download (recorded in the manifest) is refused too
    server.files[f"/val2014/{coco_file_name(133)}"] = _jpeg(999)
    (out / coco_file_name(74)).write_bytes(b"corrupt")
    rc, so, se = cli_inproc(args)
    assert rc == 2 and se.count("\n") == 1 and coco_file_name(133) in se and "manifest.json" in se, se
    assert _sha(_jpeg(133)) in se and _sha(_jpeg(999)) in se and not (out / coco_file_name(133)).exists()
    assert (out / coco_file_name(74)).read_bytes() == _jpeg(74)  # the corrupt local copy was fetched again


def test_coco_id_list_derived_from_annotations(cli_inproc, tmp_path, server, monkeypatch):
    """No id list ships (NeMo's CSV has no image ids): the list is derived from COCO's caption annotations."""
    import csv

    if not NEMO_COCO.is_file():
        pytest.skip("needs ../shared/data (NeMo's COCO CSV)")
    monkeypatch.setenv("MEMOBENCH_DATA_DIR", str(DATA))
    with open(NEMO_COCO, newline="", encoding="utf-8") as f:
        captions = [r["Caption"] for r in csv.DictReader(f, delimiter=";")]
    ann = {"images": [], "annotations": [
        {"image_id": 500, "id": 1, "caption": "  " + captions[0].upper() + " "},  # case/whitespace differ
        {"image_id": 9, "id": 2, "caption": captions[1]},
        {"image_id": 7, "id": 3, "caption": captions[1]},  # same caption on two images: the smaller id
        {"image_id": 11, "id": 4, "caption": captions[2]},
        {"image_id": 12, "id": 5, "caption": "a caption NeMo does not use"}]}
    built = coco_ids_from_annotations(captions, ann)
    assert built["ids"] == [500, 7, 11] and built["rows"] == [0, 1, 2]
    assert len(built["unmatched_rows"]) == len(captions) - 3 and built["sha256"] == id_list_sha256([500, 7, 11])

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("annotations/captions_val2014.json", json.dumps(ann))
    server.files["/annotations_trainval2014.zip"] = buf.getvalue()
    for i in (500, 7, 11):
        server.files[f"/val2014/{coco_file_name(i)}"] = _jpeg(i)
    out = tmp_path / "coco"
    rc, so, se = cli_inproc(["data", "fetch", "coco", "--annotations", server.url + "/annotations_trainval2014.zip",
                             "--base-url", server.url + "/val2014", "--out", out, "--no-progress",
                             "--cache-dir", tmp_path / "c"])
    assert rc == 0, se
    man = json.loads((out / COCO_MANIFEST).read_text())
    assert man["ids_sha256"] == id_list_sha256([500, 7, 11]) and man["ids_source"]["kind"].startswith("derived")
    assert man["ids_source"]["annotations_sha256"] == _sha(buf.getvalue())
    assert man["ids_source"]["n_unmatched_captions"] == len(captions) - 3

    # the fidelity metric scores against that folder and records the id list it came from
    _tiny_extractor()
    w = tmp_path / "tiny.safetensors"
    w.write_bytes(_tiny_weights_bytes(tmp_path))
    cls = _inception_like(server.url)
    v = cls(cls.Params(weights_path=str(w), reference_dir=str(out), image_size=32)).compute(
        _fid_samples(), Context(cache_dir=tmp_path / "c", offline=True))["fid"]
    assert v.unavailable is None and v.impl["n_ref"] == 3
    assert v.impl["reference"]["id_list_sha256"] == id_list_sha256([500, 7, 11])
