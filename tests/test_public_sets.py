"""Public prompt sets (``memobench_plugins.public_sets``) and the data layer (``memobench.data``).

The prompt files are read from the verbatim copies in ``../shared/data/`` (METHODS §2.8) through
``MEMOBENCH_DATA_DIR`` with ``offline=True``, so nothing is downloaded. Downloads are exercised with ``file://``
URLs. Expected numbers: METHODS §8.4.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import pluggy
import pytest
from PIL import Image

from memobench import hookspecs
from memobench.api import Context, Prompt
from memobench.data import DATA_DIR_ENV, DataError, GroundTruthStore, fetch, file_sha256

import memobench_plugins.public_sets as ps

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"prompt data copies not found at {DATA}")

EXPECTED_COUNTS = {
    "wen500": 500, "nemo-mem": 500, "nemo-vm": 112, "nemo-tm": 388, "nemo-nonmem": 500, "coco10k": 10_000,
    "memattn-sd1": 345, "memattn-sd2": 219, "memattn-nomem": 500, "membench": 3000,
    **{f"t2icompbench-{c}": 300 for c in ("color", "shape", "texture", "spatial", "3d_spatial", "non_spatial",
                                          "numeracy", "complex")},
}
BY_NAME = {cls.name: cls for cls in ps.PROMPT_SETS}


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    """Offline context whose data files come from ../shared/data."""
    if not DATA.is_dir():
        pytest.skip(f"prompt data copies not found at {DATA}")
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA))
    return Context(cache_dir=tmp_path / "cache", offline=True)


def load(name: str, ctx: Context, **params) -> list[Prompt]:
    return BY_NAME[name](**params).prompts(ctx)


# ------------------------------------------------------------------------------------------------ registration
def test_hook_registers_all_sets():
    pm = pluggy.PluginManager("memobench")
    pm.add_hookspecs(hookspecs)
    pm.register(ps, name="public_sets")
    pm.check_pending()
    got = []
    pm.hook.register_prompt_sets(register=lambda cls, aliases=(): got.append(cls))
    assert sorted(c.name for c in got) == sorted(EXPECTED_COUNTS)
    for cls in got:
        assert cls.version and cls.__doc__ and cls.name
        prov = cls().provenance()
        assert set(prov) >= {"repository", "path", "commit", "license", "url", "sha256"}
        assert prov["url"] == f"https://raw.githubusercontent.com/{prov['repository']}/{prov['commit']}/{prov['path']}"
        assert len(prov["sha256"]) == 64


def test_params_from_strings():
    p = ps.Coco10k.make_params({"limit": "5", "data_file": "/x/y.csv"})
    assert p.limit == 5 and p.data_file == "/x/y.csv"


def test_no_data_file_in_package():
    files = [p for p in (REPO / "plugins" / "public_sets").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert files and all(p.suffix == ".py" for p in files), files


@requires_data
def test_pinned_sha256_match_verbatim_copies():
    for cls in ps.PROMPT_SETS:
        prov = cls().provenance()
        for f in prov.get("files", [prov]):
            matches = list(DATA.rglob(Path(f["path"]).name))
            assert len(matches) == 1, f["path"]
            assert file_sha256(matches[0]) == f["sha256"], f["path"]


# ------------------------------------------------------------------------------------------------ contents
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_row_counts_and_unique_ids(ctx, name):
    prompts = load(name, ctx)
    assert len(prompts) == EXPECTED_COUNTS[name]
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.text and p.text == p.text.strip() and "\r" not in p.text and "\n" not in p.text for p in prompts)


def test_limit(ctx):
    assert [p.id for p in load("nemo-mem", ctx, limit=3)] == [p.id for p in load("nemo-mem", ctx)[:3]]


def test_nemo_labels(ctx):
    mem = load("nemo-mem", ctx)
    assert collections.Counter(p.mem_type for p in mem) == {"VM": 112, "TM": 388}
    no_sscd = [p for p in mem if p.meta["max_sscd"] is None]
    assert len(no_sscd) == 13 and all(p.mem_type == "TM" and p.meta["mean_sscd"] is None for p in no_sscd)
    vm_max = [p.meta["max_sscd"] for p in mem if p.mem_type == "VM"]
    assert 0.70 < min(vm_max) and max(vm_max) < 0.97
    assert all(p.reference_ids == (p.id,) and p.meta["url"].startswith("http") for p in mem)
    vm, tm = load("nemo-vm", ctx), load("nemo-tm", ctx)
    assert {p.id for p in vm} | {p.id for p in tm} == {p.id for p in mem}
    assert {p.mem_type for p in vm} == {"VM"} and {p.mem_type for p in tm} == {"TM"}


def test_wen_jsonl_equals_nemo_csv_row_by_row(ctx):
    wen, nemo = load("wen500", ctx), load("nemo-mem", ctx)
    assert len(wen) == len(nemo) == 500
    for w, n in zip(wen, nemo):
        assert (w.text, w.meta["url"], w.meta["laion_index"], w.id) == \
               (n.text, n.meta["url"], n.meta["laion_index"], n.id)
    assert all(w.mem_type is None for w in wen)


def test_nonmem_disjoint_from_memorized(ctx):
    non = load("nemo-nonmem", ctx)
    assert {p.mem_type for p in non} == {"NONMEM"}
    assert not {p.text for p in non} & {p.text for p in load("nemo-mem", ctx)}
    assert all(p.meta["url"].startswith("http") and p.reference_ids == (p.id,) for p in non)


def test_memattn_sd1_subset_of_500(ctx):
    sd1, nemo = load("memattn-sd1", ctx), {p.text: p for p in load("nemo-mem", ctx)}
    assert all(p.text in nemo and nemo[p.text].id == p.id for p in sd1)
    assert collections.Counter(p.mem_type for p in sd1) == {"VM": 103, "TM": 242}
    assert {p.mem_type for p in load("memattn-nomem", ctx)} == {"NONMEM"}
    assert sum(p.text.startswith("Shaw Floors") for p in load("memattn-sd2", ctx)) == 158


def test_membench_urls(ctx):
    mb = load("membench", ctx)
    assert [p.id for p in mb] == [str(i) for i in range(3000)]
    urls = [u for p in mb for u in p.meta["urls"]]
    assert len(set(urls)) == 151
    assert max(len(p.meta["urls"]) for p in mb) == 16
    assert all(u.startswith("http") and "'" not in u for u in urls)
    for p in mb:
        assert [p.meta["reference_urls"][r] for r in p.reference_ids] == list(dict.fromkeys(p.meta["urls"]))
    # cross-check the literal parsing against the raw file
    first = (DATA / "membench" / "SD1_final.csv").read_text(encoding="utf-8").splitlines()[1]
    assert mb[0].meta["urls"] == ast.literal_eval(first.split(",", 2)[2])


@pytest.mark.parametrize("category", ps.T2I_CATEGORIES)
def test_t2i_val_300_unique(ctx, category):
    prompts = load(f"t2icompbench-{category}", ctx)
    assert len({p.text for p in prompts}) == 300
    assert all(p.mem_type is None and p.reference_ids == () for p in prompts)


def test_t2i_complex_partition(ctx):
    kinds = collections.Counter(p.meta["complex_kind"] for p in load("t2icompbench-complex", ctx))
    assert kinds == {"action": 212, "spatial": 58, "spatialaction": 30}


def test_quoted_and_semicolon_captions(ctx):
    coco = {p.id: p for p in load("coco10k", ctx)}
    assert list(coco)[:2] == ["0000", "0001"] and all(len(i) == 4 for i in coco)
    assert coco["0000"].meta["index"] == "0000" and coco["0000"].reference_ids == ()
    assert coco["1125"].text == ("A bottle of good Shiraz sits beside a glass with some in it; something yummy "
                                 "to eat appears in the background.")
    assert coco["1003"].text == 'A painted school bus reads "Van Gogh Museum Bus".'
    non = {p.meta["row"]: p for p in load("nemo-nonmem", ctx)}
    assert non[68].text.startswith("Maroon Bells, September 16th 2008 This image is a panorama; three images")
    assert non[68].meta["url"].startswith("http")
    mem = {p.meta["row"]: p for p in load("nemo-mem", ctx)}
    assert mem[3].text == '"Watch: Passion Pit\'s New Video, ""Lifted Up (1985)"""'
    assert mem[81].meta["url"].startswith("https://s7d9.scene7.com/") and mem[81].mem_type in ("VM", "TM")
    assert sum('"' in p.text or ";" in p.text for p in mem.values()) == 9


def test_data_file_param_without_data_dir(tmp_path, monkeypatch):
    if not DATA.is_dir():
        pytest.skip(f"prompt data copies not found at {DATA}")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    ctx = Context(cache_dir=tmp_path, offline=True)
    f = DATA / "memattn" / "sd2_mem219.txt"
    s = ps.MemAttnSD2(data_file=str(f))
    assert len(s.prompts(ctx)) == 219
    assert s.provenance()["data_file"] == str(f)


# ------------------------------------------------------------------------------------------------ fetch errors
def test_sha256_mismatch_raises(tmp_path, monkeypatch):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "memorized_laion_prompts.csv").write_text(";Caption;URL;type;mean_sscd;max_sscd;Index\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(bad_dir))
    ctx = Context(cache_dir=tmp_path / "cache", offline=True)
    with pytest.raises(DataError) as e:
        ps.NemoMemorized().prompts(ctx)
    msg = str(e.value)
    assert ps.NEMO_MEM.sha256 in msg and "\n" not in msg and DATA_DIR_ENV in msg
    with pytest.raises(DataError, match="expected " + ps.NEMO_MEM.sha256):
        fetch(ps.NEMO_MEM.url, ps.NEMO_MEM.sha256, tmp_path, True,
              local_path=bad_dir / "memorized_laion_prompts.csv")


def test_offline_and_absent_raises_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "empty"))
    ctx = Context(cache_dir=tmp_path / "cache", offline=True)
    with pytest.raises(DataError) as e:
        ps.MemBench().prompts(ctx)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "\n" not in msg and "SD1_final.csv" in msg and DATA_DIR_ENV in msg and "--offline" in msg
    assert ps.MEMBENCH_CSV.url in msg
    with pytest.raises(DataError, match="does not exist"):
        fetch(ps.MEMBENCH_CSV.url, ps.MEMBENCH_CSV.sha256, tmp_path, True, local_path=tmp_path / "nope.csv")


def test_fetch_downloads_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    src = tmp_path / "src" / "prompts.txt"
    src.parent.mkdir()
    src.write_bytes(b"a cat\nan astronaut riding a horse\n")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    got = fetch(src.as_uri(), sha, cache, offline=False)
    assert got == cache / "data" / sha[:2] / f"{sha}-prompts.txt"
    assert got.read_bytes() == src.read_bytes()
    src.unlink()
    assert fetch(src.as_uri(), sha, cache, offline=True) == got  # served from the cache
    # a download with the wrong content is rejected and leaves nothing behind
    other = tmp_path / "src" / "other.txt"
    other.write_bytes(b"changed upstream\n")
    with pytest.raises(DataError, match="expected " + "0" * 64):
        fetch(other.as_uri(), "0" * 64, cache, offline=False)
    assert [p for p in (cache / "data").rglob("*") if p.is_file()] == [got]  # no partial or temp files
    with pytest.raises(DataError, match="could not download"):
        fetch((tmp_path / "missing.txt").as_uri(), sha, tmp_path / "c2", offline=False)


# ------------------------------------------------------------------------------------------------ ground truth
def _png(path: Path, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_ground_truth_store_success_and_cache(tmp_path):
    arr = _png(tmp_path / "gt.png")
    url = (tmp_path / "gt.png").as_uri()
    store = GroundTruthStore(tmp_path / "cache", offline=False)
    img = store.get("laion:1", url)
    assert img is not None and img.dtype == np.uint8 and np.array_equal(img, arr)
    sha = store.sha256("laion:1")
    assert sha == file_sha256(tmp_path / "gt.png") and store.path("laion:1").is_file()
    index = json.loads((tmp_path / "cache" / "groundtruth" / "index.json").read_text())
    assert index["items"]["laion:1"]["sha256"] == sha and index["missing"] == {}
    (tmp_path / "gt.png").unlink()
    again = GroundTruthStore(tmp_path / "cache", offline=True).get("laion:1", url)
    assert np.array_equal(again, arr)


def test_ground_truth_store_records_missing_never_blank(tmp_path):
    url = (tmp_path / "does-not-exist.png").as_uri()
    store = GroundTruthStore(tmp_path / "cache", offline=False)
    assert store.get("laion:404", url) is None
    [m] = store.missing
    assert m["key"] == "laion:404" and m["url"] == url and m["persistent"] and "No such file" in m["reason"]
    assert store.path("laion:404") is None
    # remembered across instances, and not retried
    store2 = GroundTruthStore(tmp_path / "cache", offline=False)
    assert [x["key"] for x in store2.missing] == ["laion:404"]
    assert store2.get("laion:404", url) is None
    # content that is not an image is missing too (never decoded into a placeholder)
    (tmp_path / "page.html").write_text("<html>gone</html>")
    assert store2.get("laion:html", (tmp_path / "page.html").as_uri()) is None
    assert "not a decodable image" in {m["key"]: m for m in store2.missing}["laion:html"]["reason"]
    # retry_missing fetches again once the file appears
    arr = _png(tmp_path / "does-not-exist.png", seed=1)
    store3 = GroundTruthStore(tmp_path / "cache", offline=False, retry_missing=True)
    assert np.array_equal(store3.get("laion:404", url), arr)
    assert "laion:404" not in {m["key"] for m in store3.missing}


def test_ground_truth_store_offline_miss_is_not_persisted(tmp_path):
    _png(tmp_path / "gt.png")
    store = GroundTruthStore(tmp_path / "cache", offline=True)
    assert store.get("laion:7", (tmp_path / "gt.png").as_uri()) is None
    [m] = store.missing
    assert not m["persistent"] and "offline" in m["reason"]
    assert not (tmp_path / "cache" / "groundtruth" / "index.json").exists()


def test_prompt_set_reference_image(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    arr = _png(tmp_path / "gt.png", seed=2)
    ctx = Context(cache_dir=tmp_path / "cache", offline=False)
    good = Prompt(id="1", text="x", reference_ids=("1",),
                  meta={"reference_urls": {"1": (tmp_path / "gt.png").as_uri()}})
    bad = Prompt(id="2", text="y", reference_ids=("2",),
                 meta={"reference_urls": {"2": (tmp_path / "no.png").as_uri()}})
    s = ps.NemoMemorized()
    assert np.array_equal(s.reference_image(good, "1", ctx), arr)
    assert s.reference_image(bad, "2", ctx) is None
    assert s.reference_image(good, "unknown", ctx) is None
    assert [m["key"] for m in s.store(ctx).missing] == ["laion:2"]
