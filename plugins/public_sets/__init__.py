"""Public prompt sets of the memorization literature (METHODS §2), as memobench prompt-set plugins.

Every set reads one pinned file of a public repository: fetched from
``https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>`` and checked against its sha256 through
:func:`memobench.data.fetch`, so a local copy (``Params.data_file`` or a file of the same name under
``$MEMOBENCH_DATA_DIR``) can replace the download. No data file ships with this package: two of them
(Wen's JSONL, MemBench's CSV) come from repositories without a license and are only read at run time.

Registered sets (``name``: source, size):

* ``wen500`` — Wen et al. ``examples/sdv1_500_memorized.jsonl``, the 500 memorized SD-1 prompts (no VM/TM labels);
* ``nemo-mem`` / ``nemo-vm`` / ``nemo-tm`` — NeMo ``prompts/memorized_laion_prompts.csv``: the same 500 prompts,
  labelled 112 VM / 388 TM (the canonical table of the 500);
* ``nemo-nonmem`` — NeMo ``prompts/unmemorized_laion_prompts.csv``: 500 non-memorized LAION prompts (``NONMEM``);
* ``coco10k`` — NeMo ``prompts/coco2014_val_10000.csv``: 10,000 COCO-2014 val captions (utility);
* ``memattn-sd1`` / ``memattn-sd2`` / ``memattn-nomem`` — MemAttn ``prompt/*.txt``: 345 / 219 / 500 prompts;
* ``membench`` — MemBench ``SD1_final.csv``: 3,000 trigger prompts with ground-truth URL lists;
* ``t2icompbench-<category>`` — T2I-CompBench ``examples/dataset/<category>_val.txt`` (300 each) for the eight
  categories ``color shape texture spatial 3d_spatial non_spatial numeracy complex``.

Prompt ids are stable: the LAION sample id for LAION-derived prompts, the ``Index`` string (``"0000"``…) for
COCO, the file's row number (0-based) otherwise. Reference (training) images are resolved through
:class:`memobench.data.GroundTruthStore`; a missing image is ``None``, never a placeholder.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memobench.api import Context, DataError, GroundTruthStore, Prompt, PromptSet, fetch, hookimpl, param


# ------------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class Source:
    """One pinned file of a public repository."""

    repository: str  # owner/name on GitHub
    commit: str
    path: str
    sha256: str
    license: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repository}/{self.commit}/{self.path}"

    def provenance(self) -> dict:
        return {"repository": self.repository, "path": self.path, "commit": self.commit, "license": self.license,
                "url": self.url, "sha256": self.sha256}


WEN_REPO, WEN_COMMIT = "YuxinWenRick/diffusion_memorization", "c8fe471d80b62213bdc8a384543ff44b44c62020"
NEMO_REPO, NEMO_COMMIT = "ml-research/localizing_memorization_in_diffusion_models", \
    "f952eded64fca0bcf42e0bb3be9a01d64653cfdb"
MEMATTN_REPO, MEMATTN_COMMIT = "renjie3/MemAttn", "c66efd22d8ffd4b1c6b87835708fa1437a2e076b"
MEMBENCH_REPO, MEMBENCH_COMMIT = "chunsanHong/MemBench_code", "f22a0fdcd24fa0f4a43bf7b9a8e42c8c78af302f"
T2I_REPO, T2I_COMMIT = "Karine-Huang/T2I-CompBench", "1b7094991a57f3c22abdd4f6e8ba6c1a15517073"

NO_LICENSE = "none (repository has no LICENSE file; read at run time, not redistributed)"

WEN_JSONL = Source(WEN_REPO, WEN_COMMIT, "examples/sdv1_500_memorized.jsonl",
                   "8eb16c6ff1c7195cddf26b3207bdc7c6a905a20162c6070d79fe60336a525c60", NO_LICENSE)
NEMO_MEM = Source(NEMO_REPO, NEMO_COMMIT, "prompts/memorized_laion_prompts.csv",
                  "0b527a5965dc463e7a3e0d234ff7fd5489b1a76869c456dbb209dc753cb4af25", "MIT")
NEMO_NONMEM = Source(NEMO_REPO, NEMO_COMMIT, "prompts/unmemorized_laion_prompts.csv",
                     "f453b418cc157864baacbf68d97447273feac41e8066b2ead6b307bf795988e1", "MIT")
NEMO_COCO = Source(NEMO_REPO, NEMO_COMMIT, "prompts/coco2014_val_10000.csv",
                   "5445e449c60fd6b326a05c79a683c4d64620b0330a372de843eb6b9dbe5901e3", "MIT")
MEMATTN_SD1 = Source(MEMATTN_REPO, MEMATTN_COMMIT, "prompt/sd1_mem345.txt",
                     "70f370c4728aecd18e0db95dc58e9741b0f1a278dbfddb31d7d0754f69f8d069", "MIT")
MEMATTN_SD2 = Source(MEMATTN_REPO, MEMATTN_COMMIT, "prompt/sd2_mem219.txt",
                     "5776ec85cc25fde8c4843af990041a85813c3af7cb817c45dabb1a1bb9b6356f", "MIT")
MEMATTN_NOMEM = Source(MEMATTN_REPO, MEMATTN_COMMIT, "prompt/group_nomem500.txt",
                       "4e0de75ae37b4fb2f8676026d876d9f4b03267a90041af4069d74b912e588c2d", "MIT")
MEMBENCH_CSV = Source(MEMBENCH_REPO, MEMBENCH_COMMIT, "SD1_final.csv",
                      "8c41867a67ea184c4f7f3c9765eeb55faa3b5058d1552e014616de9198d110c7", NO_LICENSE)

T2I_VAL_SHA256 = {
    "color": "1634259756dbc77d13093d907d414480080ec9790a8c97ad09efaea7b2534f2d",
    "shape": "37e1a276906c7ea9516cbd7ac8501be896006c0c17ca7344f260562834455bae",
    "texture": "fbb5363515b4a28009e360afaaaf389d2dd2289e50dbb0c6ef4ea0c7fe4f3d4f",
    "spatial": "8707a1d7e42ce3002d95363cf55f74bd043c843ae27108f5125aaaa7840ca988",
    "3d_spatial": "c9953597315f36a5fcb41291bb19bdc6ab5f64a0fa760d691b4854a73f5d1fe9",
    "non_spatial": "04c56cc9ac441dc9ea6c5157652058bd1635b5308526dd31bb29a1caab9a758d",
    "numeracy": "dad8df141604b70ba7554bec724e3db0a80023680769b5c514854ea2d2527bbe",
    "complex": "1b808018b8d9916db3d47d5aa2ef18377a3549a56901a474156f799824cdf3b4",
}
T2I_COMPLEX_PARTS_SHA256 = {  # exact partition of complex_val.txt, read by the 3-in-1 scorer
    "action": "d49ee4c7f99e3f3379fb8704a54ff5288b83bb412971edf616a4721c2473308e",
    "spatial": "6c7ac0ab75c7c9080cfc7b421fb059b9b0febb98471707aeedf58771088abc02",
    "spatialaction": "e02ddc7fed812e6577e7386ec2137ce0a994a5ce19771661f68df7ac349a6ca9",
}
T2I_CATEGORIES = tuple(T2I_VAL_SHA256)


def t2i_source(filename: str, sha256: str) -> Source:
    return Source(T2I_REPO, T2I_COMMIT, f"examples/dataset/{filename}", sha256, "MIT")


# ------------------------------------------------------------------------------------------------ parsing
def read_text(path: Path) -> str:
    """UTF-8 text of a data file (a leading BOM is dropped)."""
    return path.read_bytes().decode("utf-8-sig")


def read_lines(path: Path) -> list[str]:
    """One prompt per line (LF or CRLF, with or without a final newline); blank lines are skipped and the
    prompts are otherwise kept verbatim."""
    return [line for line in read_text(path).splitlines() if line.strip()]


def read_csv(path: Path, delimiter: str) -> list[dict]:
    """Rows of a CSV with a header, parsed by a real CSV reader (captions contain quotes and ``;``).

    The unnamed leading column (pandas' saved index) is returned under the key ``"row"``.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    header = next(reader)
    keys = ["row" if (i == 0 and not h.strip()) else h for i, h in enumerate(header)]
    rows = []
    for n, values in enumerate(reader, start=2):
        if not values:
            continue
        if len(values) != len(keys):
            raise DataError(f"{path}: line {n} has {len(values)} fields, expected {len(keys)} ({', '.join(keys)})")
        rows.append(dict(zip(keys, values)))
    return rows


def _float_or_none(s: str) -> float | None:
    s = s.strip()
    return float(s) if s else None


def _url_ref_id(url: str) -> str:
    """Reference id of an image URL (MemBench lists URLs, not LAION ids)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ base class
class FileSet(PromptSet):
    """A prompt set backed by one pinned file (plus optional helper files listed in ``extra_sources``)."""

    version: ClassVar[str] = "1"
    source: ClassVar[Source]
    extra_sources: ClassVar[tuple[Source, ...]] = ()
    ref_namespace: ClassVar[str] = "laion"  # ground-truth store keys are "<namespace>:<ref_id>"

    @dataclass
    class Params:
        data_file: str | None = param(None, "local copy of the file (otherwise $MEMOBENCH_DATA_DIR, cache, download)")
        data_sha256: str | None = param(None, "sha256 of data_file when it deliberately differs from the pinned one")
        limit: int = param(0, "keep only the first `limit` prompts (0 = all)")

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._prompts: list[Prompt] | None = None
        self._stores: dict[tuple[str, bool], GroundTruthStore] = {}

    # -- files
    def _primary_sha256(self) -> str:
        return (self.params.data_sha256 or self.source.sha256).lower()

    def _file(self, ctx: Context) -> Path:
        """The set's own file (``Params.data_file`` overrides the lookup)."""
        return fetch(self.source.url, self._primary_sha256(), ctx.cache_dir, ctx.offline,
                     local_path=self.params.data_file)

    @staticmethod
    def _helper_file(src: Source, ctx: Context) -> Path:
        return fetch(src.url, src.sha256, ctx.cache_dir, ctx.offline)

    # -- PromptSet API
    def load(self, ctx: Context) -> list[Prompt]:
        """Parse the file(s) into prompts (all rows; ``prompts`` applies ``limit``)."""
        raise NotImplementedError

    def prompts(self, ctx: Context) -> list[Prompt]:
        if self._prompts is None:
            self._prompts = self.load(ctx)
        limit = int(self.params.limit or 0)
        return list(self._prompts[:limit] if limit > 0 else self._prompts)

    def store(self, ctx: Context) -> GroundTruthStore:
        """The ground-truth store of ``ctx`` (one per cache folder and offline flag)."""
        key = (str(ctx.cache_dir), bool(ctx.offline))
        if key not in self._stores:
            self._stores[key] = GroundTruthStore(ctx.cache_dir, ctx.offline)
        return self._stores[key]

    def reference_image(self, prompt: Prompt, ref_id: str, ctx: Context):
        url = (prompt.meta.get("reference_urls") or {}).get(ref_id)
        if not url:
            return None
        return self.store(ctx).get(f"{self.ref_namespace}:{ref_id}", url)

    def provenance(self) -> dict:
        out = self.source.provenance()
        out["sha256"] = self._primary_sha256()
        if self.params.data_file:
            out["data_file"] = str(self.params.data_file)
        if self.extra_sources:
            out["files"] = [self.source.provenance() | {"sha256": out["sha256"]}] + \
                           [s.provenance() for s in self.extra_sources]
        return out


# ------------------------------------------------------------------------------------------------ LAION sets
def _laion_prompt(laion_id: str, text: str, url: str, row: int, mem_type: str | None, **meta) -> Prompt:
    laion_id = str(int(laion_id))
    refs = (laion_id,) if url else ()
    return Prompt(id=laion_id, text=text, mem_type=mem_type, reference_ids=refs,
                  meta={"row": row, "laion_index": int(laion_id), "url": url,
                        "reference_urls": {laion_id: url} if url else {}, **meta})


class Wen500(FileSet):
    """The 500 memorized SD-1 prompts as distributed by Wen, Liu, Chen, Lyu, "Detecting, Explaining, and
    Mitigating Memorization in Diffusion Models" (ICLR 2024), repository ``YuxinWenRick/diffusion_memorization``
    (``examples/sdv1_500_memorized.jsonl``; collected with Webster's extraction tool). Unlabelled (no VM/TM);
    the repository has no license, so the file is only read at run time."""

    name = "wen500"
    source = WEN_JSONL

    def load(self, ctx):
        path = self._file(ctx)
        out = []
        for row, line in enumerate(read_text(path).splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            out.append(_laion_prompt(rec["index"], rec["caption"], rec.get("url") or "", row, None,
                                     memorized=True))
        return out


class NemoMemorized(FileSet):
    """The 500 memorized SD-1 prompts with NeMo's verbatim/template labels (112 VM / 388 TM): Hintersdorf,
    Struppek et al., "Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion Models"
    (NeurIPS 2024), repository ``ml-research/localizing_memorization_in_diffusion_models``
    (``prompts/memorized_laion_prompts.csv``). memobench's canonical table of the 500; ``meta`` keeps
    ``mean_sscd``/``max_sscd`` (``None`` for the 13 manually labelled TM rows)."""

    name = "nemo-mem"
    source = NEMO_MEM
    types: ClassVar[tuple[str, ...]] = ("VM", "TM")

    def load(self, ctx):
        out = []
        for r in read_csv(self._file(ctx), ";"):
            mem_type = r["type"].strip()
            if mem_type not in self.types:
                continue
            out.append(_laion_prompt(r["Index"], r["Caption"], r["URL"], int(r["row"]), mem_type,
                                     memorized=True, mean_sscd=_float_or_none(r["mean_sscd"]),
                                     max_sscd=_float_or_none(r["max_sscd"])))
        return out


class NemoVerbatim(NemoMemorized):
    """The 112 verbatim-memorized (VM) prompts of NeMo's ``prompts/memorized_laion_prompts.csv``
    (``ml-research/localizing_memorization_in_diffusion_models``; Hintersdorf, Struppek et al., NeurIPS 2024)."""

    name = "nemo-vm"
    types = ("VM",)


class NemoTemplate(NemoMemorized):
    """The 388 template-memorized (TM) prompts of NeMo's ``prompts/memorized_laion_prompts.csv``
    (``ml-research/localizing_memorization_in_diffusion_models``; Hintersdorf, Struppek et al., NeurIPS 2024)."""

    name = "nemo-tm"
    types = ("TM",)


class NemoNonMemorized(FileSet):
    """500 non-memorized LAION prompts with their image URLs (``mem_type = "NONMEM"``), disjoint from the 500
    memorized ones: NeMo (Hintersdorf, Struppek et al., NeurIPS 2024), repository
    ``ml-research/localizing_memorization_in_diffusion_models``, ``prompts/unmemorized_laion_prompts.csv``."""

    name = "nemo-nonmem"
    source = NEMO_NONMEM

    def load(self, ctx):
        return [_laion_prompt(r["Index"], r["Caption"], r["URL"], int(r["row"]), "NONMEM", memorized=False)
                for r in read_csv(self._file(ctx), ";")]


class Coco10k(FileSet):
    """10,000 MS-COCO 2014 val captions used by NeMo for FID/KID/CLIP scores (Hintersdorf, Struppek et al.,
    NeurIPS 2024; ``ml-research/localizing_memorization_in_diffusion_models``, ``prompts/coco2014_val_10000.csv``).
    The ``Index`` column is a zero-padded row number kept as a string (it is *not* a COCO image id) and the URL
    column is empty, so the set has no reference images."""

    name = "coco10k"
    source = NEMO_COCO

    def load(self, ctx):
        return [Prompt(id=r["Index"], text=r["Caption"], mem_type=None,
                       meta={"row": int(r["row"]), "index": r["Index"]})
                for r in read_csv(self._file(ctx), ";")]


# ------------------------------------------------------------------------------------------------ MemAttn
class _LinesSet(FileSet):
    """One prompt per line; id = 0-based row number."""

    mem_type: ClassVar[str | None] = None
    memorized: ClassVar[bool | None] = None

    def load(self, ctx):
        extra = {} if self.memorized is None else {"memorized": self.memorized}
        return [Prompt(id=str(i), text=t, mem_type=self.mem_type, meta={"row": i, **extra})
                for i, t in enumerate(read_lines(self._file(ctx)))]


class MemAttnSD1(FileSet):
    """345 memorized SD-1 prompts of MemAttn (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image
    Diffusion Models through Cross Attention", ECCV 2024), repository ``renjie3/MemAttn``,
    ``prompt/sd1_mem345.txt``: a subset of the 500. Joined on the exact caption with NeMo's
    ``prompts/memorized_laion_prompts.csv`` for the LAION id (the prompt id), VM/TM label (103 / 242) and image URL;
    a line without a match (only possible with a custom ``data_file``) gets id ``row-<n>`` and no label."""

    name = "memattn-sd1"
    source = MEMATTN_SD1
    extra_sources = (NEMO_MEM,)

    def load(self, ctx):
        nemo = {r["Caption"]: r for r in read_csv(self._helper_file(NEMO_MEM, ctx), ";")}
        out = []
        for i, text in enumerate(read_lines(self._file(ctx))):
            r = nemo.get(text)
            if r is None:
                out.append(Prompt(id=f"row-{i}", text=text, meta={"row": i, "memorized": True}))
            else:
                out.append(_laion_prompt(r["Index"], text, r["URL"], i, r["type"].strip(), memorized=True,
                                         nemo_row=int(r["row"])))
        return out


class MemAttnSD2(_LinesSet):
    """219 memorized SD-2 prompts of MemAttn (Ren et al., ECCV 2024), repository ``renjie3/MemAttn``,
    ``prompt/sd2_mem219.txt`` (mostly "Shaw Floors …" template prompts). Unlabelled, no reference images."""

    name = "memattn-sd2"
    source = MEMATTN_SD2
    memorized = True


class MemAttnNoMem(_LinesSet):
    """500 short generic non-memorized prompts (``NONMEM``) of MemAttn (Ren et al., ECCV 2024), repository
    ``renjie3/MemAttn``, ``prompt/group_nomem500.txt``."""

    name = "memattn-nomem"
    source = MEMATTN_NOMEM
    mem_type = "NONMEM"
    memorized = False


# ------------------------------------------------------------------------------------------------ MemBench
class MemBench(FileSet):
    """3,000 SD-1.4 memorized-image trigger prompts (lower-cased) of MemBench (Hong, Oh, Sung, "MemBench: Memorized
    Image Trigger Prompt Dataset for Diffusion Models", TMLR 2025), repository ``chunsanHong/MemBench_code``,
    ``SD1_final.csv``. Each prompt lists its ground-truth image URLs (a Python literal, parsed with
    ``ast.literal_eval``; 151 distinct URLs); reference ids are the first 16 hex digits of each URL's sha256.
    The repository has no license, so the file is only read at run time."""

    name = "membench"
    source = MEMBENCH_CSV
    ref_namespace = "url"

    def load(self, ctx):
        path = self._file(ctx)
        out = []
        for r in read_csv(path, ","):
            try:
                urls = ast.literal_eval(r["urls"])
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{path}: row {r['row']}: urls is not a Python list literal ({e})") from e
            if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) for u in urls):
                raise DataError(f"{path}: row {r['row']}: urls is not a list of strings")
            refs = {_url_ref_id(u): u for u in urls}
            out.append(Prompt(id=r["row"], text=r["prompt"], mem_type=None, reference_ids=tuple(refs),
                              meta={"row": int(r["row"]), "urls": list(urls), "reference_urls": refs,
                                    "memorized": True}))
        return out


# ------------------------------------------------------------------------------------------------ T2I-CompBench
class T2ICompBench(_LinesSet):
    """Base of the T2I-CompBench evaluation splits (Huang et al., "T2I-CompBench: A Comprehensive Benchmark for
    Open-world Compositional Text-to-image Generation", NeurIPS 2023), repository ``Karine-Huang/T2I-CompBench``,
    ``examples/dataset/<category>_val.txt`` (300 prompts each). Utility prompts: no labels, no references."""

    category: ClassVar[str] = ""


class T2ICompBenchComplex(T2ICompBench):
    """T2I-CompBench ``complex_val.txt`` (300 prompts; Huang et al., NeurIPS 2023, ``Karine-Huang/T2I-CompBench``).
    ``meta["complex_kind"]`` is ``action`` / ``spatial`` / ``spatialaction`` from the
    ``complex_val_{action,spatial,spatialaction}.txt`` partition (212 / 58 / 30), which the 3-in-1 scorer needs."""

    name = "t2icompbench-complex"
    category = "complex"
    source = t2i_source("complex_val.txt", T2I_VAL_SHA256["complex"])
    extra_sources = tuple(t2i_source(f"complex_val_{k}.txt", s) for k, s in T2I_COMPLEX_PARTS_SHA256.items())

    def load(self, ctx):
        kind_of: dict[str, str] = {}
        for kind, src in zip(T2I_COMPLEX_PARTS_SHA256, self.extra_sources):
            for text in read_lines(self._helper_file(src, ctx)):
                kind_of.setdefault(text, kind)
        prompts = super().load(ctx)
        for p in prompts:
            p.meta["complex_kind"] = kind_of.get(p.text)
        return prompts


def _make_t2i_class(category: str) -> type[T2ICompBench]:
    filename = f"{category}_val.txt"
    doc = (f"T2I-CompBench ``{category}`` evaluation split: ``examples/dataset/{filename}`` of "
           "``Karine-Huang/T2I-CompBench`` (Huang et al., NeurIPS 2023), 300 prompts, id = 0-based row number.")
    if category == "color":
        doc += (" Changed upstream on 2025-09-03 (5 duplicates replaced): scores before/after that commit are not "
                "comparable, hence the pinned sha256.")
    cls_name = "T2ICompBench" + "".join(part.capitalize() for part in category.split("_"))
    return type(cls_name, (T2ICompBench,), {
        "__doc__": doc, "__module__": __name__, "name": f"t2icompbench-{category}", "category": category,
        "source": t2i_source(filename, T2I_VAL_SHA256[category]),
    })


T2I_CLASSES: dict[str, type[T2ICompBench]] = {
    c: (T2ICompBenchComplex if c == "complex" else _make_t2i_class(c)) for c in T2I_CATEGORIES
}

PROMPT_SETS: tuple[type[FileSet], ...] = (
    Wen500, NemoMemorized, NemoVerbatim, NemoTemplate, NemoNonMemorized, Coco10k,
    MemAttnSD1, MemAttnSD2, MemAttnNoMem, MemBench, *T2I_CLASSES.values(),
)


@hookimpl
def register_prompt_sets(register):
    for cls in PROMPT_SETS:
        register(cls)
