"""Issue 25, defects 1 and 7: hub models resolve to a pinned snapshot with one identity online and offline; DDIM
never clips. A fake Hugging Face cache (``models--org--name/{refs,snapshots}``) stands in for the hub: no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memobench.config import BadInput
from memobench.model import DiffusionModel, weights_identity
from memobench_plugins.sd_random.testing import save_tiny_random_pipeline

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe") / "p"
    save_tiny_random_pipeline(d, seed=0, tokenizer_dir=tmp_path_factory.mktemp("tok"))
    return d


@pytest.fixture
def hub(tmp_path, monkeypatch, pipeline_dir):
    """A Hugging Face cache holding ``memobench-test/sd`` at two commits (B: other UNet weights); refs/main = A."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    repo = cache / "models--memobench-test--sd"
    shutil.copytree(pipeline_dir, repo / "snapshots" / COMMIT_A)
    shutil.copytree(pipeline_dir, repo / "snapshots" / COMMIT_B)
    w = repo / "snapshots" / COMMIT_B / "unet" / "diffusion_pytorch_model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 1  # one bit of one weight differs
    w.write_bytes(bytes(b))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a download attempt fails at once
    monkeypatch.setenv("MEMOBENCH_CACHE_DIR", str(tmp_path / "mb"))
    return repo


def _fake_download(repo):
    """``snapshot_download`` as it behaves online: resolve the revision to a commit, return that snapshot folder."""
    calls = []

    def download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns,
                      "local_files_only": local_files_only})
        commit = revision if revision and len(revision) == 40 else (repo / "refs" / "main").read_text()
        return str(repo / "snapshots" / commit)

    return download, calls


def test_hub_identity_same_online_offline_and_local_copy(hub, monkeypatch, pipeline_dir):
    import huggingface_hub

    offline = DiffusionModel.from_pretrained("memobench-test/sd", offline=True)
    download, calls = _fake_download(hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    online = DiffusionModel.from_pretrained("memobench-test/sd", offline=False)
    local = DiffusionModel.from_pretrained(str(pipeline_dir))
    ident = weights_identity(pipeline_dir)
    assert offline.identity()["revision_or_sha256"] == online.identity()["revision_or_sha256"] == ident
    assert local.identity()["revision_or_sha256"] == ident
    assert online.source["commit"] == COMMIT_A and online.source["hub_id"] == "memobench-test/sd"
    assert offline.source["commit"] == COMMIT_A
    # only the diffusers pipeline files are fetched (no single-file .ckpt, pickles or fp16 variants)
    assert calls and "unet/diffusion_pytorch_model.safetensors" in calls[0]["allow_patterns"]
    assert not any(p.endswith((".ckpt", ".bin")) for p in calls[0]["allow_patterns"])


def test_changed_snapshot_changes_identity(hub, monkeypatch):
    import huggingface_hub

    download, calls = _fake_download(hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    a = DiffusionModel.from_pretrained("memobench-test/sd")
    (hub / "refs" / "main").write_text(COMMIT_B)  # the hub's main moved to other weights
    b = DiffusionModel.from_pretrained("memobench-test/sd")
    assert a.identity()["revision_or_sha256"] != b.identity()["revision_or_sha256"]
    assert b.source["commit"] == COMMIT_B
    pinned = DiffusionModel.from_pretrained("memobench-test/sd", revision=COMMIT_A)  # revision pins the snapshot
    assert calls[-1]["revision"] == COMMIT_A
    assert pinned.identity()["revision_or_sha256"] == a.identity()["revision_or_sha256"]


def test_sha256_pin_refuses_other_weights(hub):
    good = weights_identity(hub / "snapshots" / COMMIT_A)
    m = DiffusionModel.from_pretrained("memobench-test/sd", offline=True, sha256=good)
    assert m.identity()["revision_or_sha256"] == good
    with pytest.raises(BadInput) as e:
        DiffusionModel.from_pretrained("memobench-test/sd", offline=True, revision=COMMIT_B, sha256=good)
    assert "\n" not in str(e.value) and "pin" in str(e.value)


def test_offline_missing_hub_model_is_one_line(hub):
    with pytest.raises(FileNotFoundError) as e:
        DiffusionModel.from_pretrained("memobench-test/absent", offline=True)
    assert "\n" not in str(e.value) and "Hugging Face cache" in str(e.value)


def test_hub_plugin_pin_through_cli(hub, tmp_path, capsys):
    """`--model-param sha256=…` on a hub model plugin: a mismatch is one `error:` line and exit 2."""
    from memobench.cli import main

    rc = main(["run", "--model", "sd", "--model-param", "path=memobench-test/sd", "--model-param",
               "sha256=" + "0" * 64, "--offline", "--prompts", "tiny-vm", "--metric", "mr", "--limit", "1",
               "--seeds", "0", "--steps", "1", "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "pinned" in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1


def test_ddim_never_clips_when_config_lacks_the_key(tmp_path, pipeline_dir):
    d = tmp_path / "p"
    shutil.copytree(pipeline_dir, d)
    f = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(f.read_text())
    cfg.pop("clip_sample", None)
    cfg["_class_name"] = "PNDMScheduler"  # as SD v1.4's folder ships it
    f.write_text(json.dumps(cfg))
    m = DiffusionModel.from_pretrained(str(d))
    assert type(m.scheduler).__name__ == "DDIMScheduler"
    assert m.scheduler.config.clip_sample is False
    assert Path(d).exists()


def test_same_weights_in_two_folders_are_one_model(tiny_pipe, tmp_path):
    """The cache identity is the weights' sha256, not where the folder lies: a copy elsewhere (another checkout, a
    mounted volume) finds the same cache entries; results still record the folder as the model's id."""
    import shutil

    from memobench.cache import key_of
    from memobench.model import DiffusionModel

    copy = tmp_path / "elsewhere" / "pipe"
    shutil.copytree(tiny_pipe, copy)
    a = DiffusionModel.from_pretrained(str(tiny_pipe), offline=True)
    b = DiffusionModel.from_pretrained(str(copy), offline=True)
    assert a.identity() == b.identity() and key_of(a.identity()) == key_of(b.identity())
    assert "id" not in a.identity() and a.model_id != b.model_id
    (copy / "unet" / "config.json").write_text((copy / "unet" / "config.json").read_text().replace("}", ', "x": 1}', 1))
    c = DiffusionModel.from_pretrained(str(copy), offline=True)  # other files: another model
    assert c.identity()["revision_or_sha256"] != a.identity()["revision_or_sha256"]
