"""Issue 25 (4): scoring streams images. The runner's samples load their pixels from the image cache on access (the
sha256 is checked then), metrics embed a batch at a time and keep features, and the start of a run does not read and
hash every cached PNG. In-memory ``Sample(image=array)`` keeps working, with the same values and the same SSCD batches
as before."""

from __future__ import annotations

import hashlib
import json
import weakref

import numpy as np
import pytest

from memobench.api import Context, Prompt, Sample
from memobench.cache import CacheError, ImageCache, png_bytes, read_png
from memobench.config import RunConfig
from memobench.runner import Runner


class _FakeSSCD:
    """A deterministic stand-in for the SSCD embedder (features from pixel statistics), batching like SSCD."""

    impl = {"name": "fake-sscd", "preset": "test", "weights_sha256": "0" * 64}

    def __init__(self, batch_size: int, on_embed=None):
        self.batch_size = batch_size
        self.on_embed = on_embed
        self.batches: list[int] = []

    def embed(self, images):
        if self.on_embed is not None:
            self.on_embed()
        self.batches.append(len(images))
        f = np.stack([np.concatenate([im.reshape(-1, 3).mean(0), im.reshape(-1, 3).std(0), [1.0, 2.0]])
                      for im in images])
        return f / np.linalg.norm(f, axis=1, keepdims=True)


def _cfg(tmp_path, tiny_pipe, metrics, seeds=12, mitigation="none"):
    return RunConfig(model="tiny", model_params={"path": str(tiny_pipe)}, mitigation=mitigation, limit=2,
                     seeds=list(range(seeds)), utility_limit=4, utility_seeds=[0], num_inference_steps=1,
                     metrics=metrics, output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                     offline=True, batch_size=8)


def test_runner_holds_at_most_a_batch_of_decoded_images(tmp_path, tiny_pipe, monkeypatch):
    """Live decoded images (arrays returned by ImageCache.get and not yet freed) never exceed an embedding batch,
    with target, baseline (sscd_gen) and utility samples; before, every image was decoded before scoring."""
    metrics = ["mr", "sscd_orig", "sscd_gen", "diversity", "tiny_alignment"]
    Runner(_cfg(tmp_path, tiny_pipe, [], mitigation="rta"), progress=False).run()  # generate only

    live: dict[int, weakref.ref] = {}  # id -> weak reference of every decoded image not yet freed
    peak = [0]
    orig_get = ImageCache.get

    def counting_get(self, key):
        img = orig_get(self, key)
        live[id(img)] = weakref.ref(img, lambda _, k=id(img): live.pop(k, None))
        peak[0] = max(peak[0], len(live))
        return img

    bs = 4
    fakes: list[_FakeSSCD] = []

    def make_embedder(self, ctx):
        fakes.append(_FakeSSCD(bs, on_embed=lambda: peak.__setitem__(0, max(peak[0], len(live)))))
        return fakes[-1]

    from memobench_plugins.memorization import _SSCDMetric

    import memobench.pipeline.score as score_mod

    monkeypatch.setattr(ImageCache, "get", counting_get)
    monkeypatch.setattr(_SSCDMetric, "make_embedder", make_embedder)
    # the run's store of decoded images (DecodedImages) keeps what fits in its byte budget: with none, only the
    # image read last stays; the rest is what the metrics hold
    monkeypatch.setattr(score_mod, "DECODED_IMAGES_MAX_BYTES", 0)
    out = Runner(_cfg(tmp_path, tiny_pipe, metrics, mitigation="rta"), progress=False).run()
    n_samples = sum(1 for _ in open(out.samples_path))
    assert out.result["errors"] == [] and n_samples == 2 * 12 + 4 and out.result["metrics"]["sscd_gen"]["n"] == 2
    # a batch of generations (sscd_gen: a batch of images + their baselines is 2 × bs at most), never all of them
    assert peak[0] <= 2 * bs + 1, f"{peak[0]} decoded images alive at once (batch {bs}, {n_samples} samples)"
    assert all(max(f.batches) <= bs for f in fakes) and len(fakes) == 4


def test_start_of_run_reads_no_png(tmp_path, tiny_pipe, monkeypatch):
    """A re-run with everything cached does not read and hash every PNG up front (only sidecars are checked); the
    PNGs read are those the scoring phase uses (here: no metric, the grid's first 8 seeds of each prompt)."""
    Runner(_cfg(tmp_path, tiny_pipe, []), progress=False).run()
    reads: list[tuple[str, str]] = []
    phase = ["start"]
    orig = ImageCache._checked_bytes

    def recording(self, key):
        reads.append((phase[0], key))
        return orig(self, key)

    orig_load = Runner._load_samples

    def marking(self, *a, **k):
        phase[0] = "score"
        return orig_load(self, *a, **k)

    monkeypatch.setattr(ImageCache, "_checked_bytes", recording)
    monkeypatch.setattr(Runner, "_load_samples", marking)
    monkeypatch.setattr(ImageCache, "verify", lambda self, key: pytest.fail(f"verify({key[:12]}) called"))
    out = Runner(_cfg(tmp_path, tiny_pipe, []), progress=False).run()
    assert out.result["status"] == "partial" and out.grid_path is not None
    assert [p for p, _ in reads if p == "start"] == []
    # the grid's 2 prompts × first 8 seeds, each decoded once (its cell size comes from the first, kept by the run's
    # DecodedImages store), not the 24 cached images
    assert len(reads) == 2 * 8 and len(set(reads)) == 2 * 8


def test_corrupt_png_found_when_a_metric_reads_it(tmp_path, tiny_pipe, monkeypatch):
    """An entry the grid does not show (seed 11) but a metric reads: one-line CacheError naming the PNG. A corrupt
    sidecar is still found at start, before anything is generated."""
    from memobench_plugins.memorization import _SSCDMetric

    monkeypatch.setattr(_SSCDMetric, "make_embedder", lambda self, ctx: _FakeSSCD(4))
    out = Runner(_cfg(tmp_path, tiny_pipe, []), progress=False).run()
    cache = ImageCache(tmp_path / "cache")
    rows = [json.loads(x) for x in open(out.samples_path)]
    key = next(x["sample_key"] for x in rows if x["seed"] == 11 and x["role"] == "target")
    png, side = cache.paths(key)
    good = png.read_bytes()
    png.write_bytes(png_bytes(255 - read_png(png)))
    with pytest.raises(CacheError) as e:
        Runner(_cfg(tmp_path, tiny_pipe, ["diversity"]), progress=False).run()
    msg = str(e.value)
    assert "\n" not in msg and str(png) in msg and "sha256" in msg
    png.write_bytes(good)
    side.write_text("{not json")
    from memobench.model import DiffusionModel

    monkeypatch.setattr(DiffusionModel, "denoise", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(CacheError, match=f"corrupt cache entry {side}"):
        Runner(_cfg(tmp_path, tiny_pipe, ["diversity"], seeds=13), progress=False).run()


def test_sample_held_or_streamed():
    p = Prompt("a", "a cat", "VM")
    a = np.full((4, 4, 3), 7, np.uint8)
    held = Sample("k", p, 0, a, [a])  # positional, as before
    assert held.image is a and held.references[0] is a and not held.has_baseline_image
    assert Sample("k", p, 0, a, [a], baseline_image=a).has_baseline_image

    calls = []

    def load():
        calls.append(1)
        return a.copy()

    s = Sample("k", p, 0, image_loader=load, baseline_loader=load, references_loader=lambda: [a, a])
    assert s.has_baseline_image and not calls
    im = s.image
    assert im is not s.image and len(calls) == 2  # loaded on every access, never kept
    assert s.__dict__.get("_image") is None and len(s.references) == 2
    t = s.replace(role="mitigated")
    assert len(calls) == 2 and t.image_loader is load and t.role == "mitigated" and s.role == "target"
    view = Sample.images([held, s, s])
    assert len(view) == 3 and len(calls) == 2 and view[0] is a
    assert [x.shape for x in view[1:]] == [(4, 4, 3)] * 2 and len(calls) == 4
    with pytest.raises(TypeError):
        s.replace(colour="red")


def _batch_log(monkeypatch):
    import memobench.sscd as sscd

    log: list[list[str]] = []
    orig = sscd._OnnxBackend.run

    def run(self, batch, normalize):
        log.append([hashlib.sha256(b.tobytes()).hexdigest()[:12] for b in batch])
        return orig(self, batch, normalize)

    monkeypatch.setattr(sscd._OnnxBackend, "run", run)
    return log


@pytest.mark.parametrize("preset", ["dori2026", "sscd_default"])
def test_streamed_scores_and_batches_equal_in_memory(tmp_path, monkeypatch, preset):
    """The SSCD metrics on streamed samples give the same values as on in-memory samples, and the ONNX model sees
    exactly the batches one ``EmbeddingCache.add`` of all images gives (the pre-streaming code path), also when
    references and generations preprocess to different shapes (``sscd_default``: short side 288, no crop)."""
    from memobench_plugins import memorization as mem

    rng = np.random.default_rng(0)
    prompts = [Prompt(f"p{i}", f"prompt {i}", "VM") for i in range(2)]
    gens = {(i, g): rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(2) for g in range(5)}
    refs = {i: [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)] for i in range(2)}
    held = [Sample(f"k{i}{g}", prompts[i], g, gens[i, g], refs[i]) for i, g in gens]
    streamed = [Sample(f"k{i}{g}", prompts[i], g, image_loader=lambda x=gens[i, g]: x.copy(),
                       references_loader=lambda r=refs[i]: [x.copy() for x in r]) for i, g in gens]
    # one cache folder per computation: the SSCD feature cache would otherwise serve the later ones without batches
    ctx, ctx2, ctx3 = (Context(cache_dir=tmp_path / n, offline=True) for n in ("held", "streamed", "add"))
    log = _batch_log(monkeypatch)
    params = {"preset": preset, "backend": "onnx", "batch_size": 3}
    m = mem.SSCDOrig(mem.SSCDOrig.Params(**params))
    v_held = m.compute(held, ctx)["sscd_orig"]
    n_held = len(log)
    v_streamed = m.compute(streamed, ctx2)["sscd_orig"]
    held_batches = log[:n_held]
    assert log[n_held:] == held_batches and n_held >= 4
    assert v_held.per_sample == v_streamed.per_sample and v_held.value == v_streamed.value

    log.clear()  # the pre-streaming path: one add() of generations then references
    cache = mem.EmbeddingCache(m.make_embedder(ctx3))
    cache.add([s.image for s in held] + [refs[i][0] for i in range(2)])
    assert log == held_batches
    for s in held:
        assert np.array_equal(cache(s.image), cache.vector(mem.image_sha256(s.image)))

    d = mem.Diversity(mem.Diversity.Params(**params))
    assert d.compute(held, ctx)["diversity"].per_sample == d.compute(streamed, ctx)["diversity"].per_sample


def test_each_generated_image_is_decoded_once_per_run(tmp_path, tiny_pipe, monkeypatch):
    """Several metrics read the same images: within the store's byte budget each PNG is decoded (and sha256-checked)
    once per run, and the scores are those of a run that decodes on every read."""
    import memobench.pipeline.score as score_mod

    metrics = ["mr", "sscd_orig", "sscd_gen", "diversity", "tiny_alignment"]
    Runner(_cfg(tmp_path, tiny_pipe, [], mitigation="rta"), progress=False).run()  # generate only
    reads: list[str] = []
    orig_get = ImageCache.get
    monkeypatch.setattr(ImageCache, "get", lambda self, key: reads.append(key) or orig_get(self, key))
    once = Runner(_cfg(tmp_path, tiny_pipe, metrics, mitigation="rta"), progress=False).run()
    assert len(reads) == len(set(reads)) > 0
    reads.clear()
    monkeypatch.setattr(score_mod, "DECODED_IMAGES_MAX_BYTES", 0)
    every = Runner(_cfg(tmp_path, tiny_pipe, metrics, mitigation="rta"), progress=False).run()
    assert len(reads) > len(set(reads))
    for k, v in once.result["metrics"].items():
        assert v["value"] == every.result["metrics"][k]["value"], k
