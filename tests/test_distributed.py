"""Sharded runs (issue 9; CONVENTIONS §9): the union of the shards is the unsharded run, bit for bit.

On the tiny random pipeline, one pairing that exercises every sharded phase — NeMo (a per-prompt fit) × DoRI (a
per-target attack), paired scoring (target + mitigated roles), a utility role, MR and tiny_alignment — with a batch
size (3) that does not divide the seeds (4), so the fixed batch boundaries matter:

1. a 2-rank torch.distributed run (gloo on CPU; each rank a forked process with RANK / WORLD_SIZE / MASTER_ADDR /
   MASTER_PORT in its environment, as torchrun and accelerate launch set them) writes a result equal to the
   single-process one: metric values, per-sample image sha256 by sample key, attack traces, everything else but
   timings and paths;
2. ``--shard 0/2`` and ``--shard 1/2`` run one after the other, then ``memobench aggregate``, give the same result;
   aggregating before the second shard exits 2 naming the missing count;
3. killing one rank mid-generation and re-running the same launch completes only that rank's missing samples (the
   cached ones are never rewritten) and gives the uninterrupted result.

Ranks are forked from the test process (no second ~20 s torch import per rank on a 2-core machine).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from memobench.cli import main
from memobench.distributed import assign_units, make_shard, parse_shard

VOLATILE = ("created_at", "timing", "env", "git_hash")
NEMO_FAST = ("samples_per_prompt=3", "pairwise_threshold=-1.0", "initial_threshold=2.0", "refinement_threshold=-1.0",
             "k_init=2", "stats_limit=16")


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def scenario_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dist-config") / "run.json"
    p.write_text(json.dumps({"metrics": ["mr", "tiny_alignment"], "utility_limit": 2, "utility_seeds": [0]}))
    return p


@pytest.fixture(scope="module")
def scenario(tiny_pipe, scenario_config):
    """``memobench run`` arguments of the NeMo × DoRI scenario for a cache and output dir."""

    def args(cache: Path, out: Path, *extra: str) -> list[str]:
        mp = [a for kv in NEMO_FAST for a in ("--mitigation-param", kv)]
        return ["run", "--model", "tiny", "--model-param", f"path={tiny_pipe}", "--config", str(scenario_config),
                "--mitigation", "nemo", *mp, "--attack", "dori", "--attack-param", "steps=1",
                "--attack-param", "batch=1", "--limit", "2", "--seeds", "0-3", "--batch-size", "3", "--steps", "2",
                "--offline", "--no-progress", "--cache-dir", str(cache), "-o", str(out), *extra]

    return args


def _result(out: Path) -> tuple[dict, list[dict]]:
    paths = [p for p in out.rglob("*.json")]
    assert len(paths) == 1, f"expected one result JSON under {out}, found {paths}"
    result = json.loads(paths[0].read_text())
    rows = [json.loads(x) for x in (paths[0].parent / result["samples_file"]).read_text().splitlines()]
    return result, rows


def _stable(result: dict, cache: Path, out: Path) -> dict:
    """The result without timings/environment, with this run's cache and output paths replaced by placeholders
    (the NeMo report names its artifact files)."""
    r = {k: v for k, v in result.items() if k not in VOLATILE}
    r["config"] = {k: v for k, v in r["config"].items() if k not in ("cache_dir", "output_dir")}
    text = json.dumps(r, sort_keys=True).replace(str(cache), "<cache>").replace(str(out), "<out>")
    return json.loads(text)


def _by_key(rows: list[dict]) -> dict[str, dict]:
    return {r["sample_key"]: r for r in rows}


def _assert_same_run(got: tuple[dict, list[dict]], ref: tuple[dict, list[dict]], dirs, ref_dirs) -> None:
    (res, rows), (ref_res, ref_rows) = got, ref
    a, b = _by_key(rows), _by_key(ref_rows)
    assert a.keys() == b.keys() and len(a) == len(rows)
    diff = [k for k in a if a[k]["image_sha256"] != b[k]["image_sha256"]]
    assert not diff, f"{len(diff)} of {len(a)} images differ from the single-process run"
    assert rows == ref_rows  # per-sample metric values and order included
    for part in ("metrics", "metrics_without_attack"):
        assert {k: v["value"] for k, v in res[part].items()} == {k: v["value"] for k, v in ref_res[part].items()}
    assert res["errors"] == ref_res["errors"] == []
    assert _stable(res, *dirs) == _stable(ref_res, *ref_dirs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(args: list[str], rank: int, world: int, port: int, log: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    code = 3
    with open(log, "w", buffering=1) as f:
        sys.stdout = sys.stderr = f
        try:
            code = main(args)
        except BaseException as e:  # noqa: BLE001 - reported through the log and the exit code
            print(f"rank {rank}: {type(e).__name__}: {e}", file=f)
        finally:
            f.flush()
    os._exit(code)


def _launch(args: list[str], logs: Path, world: int = 2) -> list:
    ctx = multiprocessing.get_context("fork")
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(args, r, world, port, str(logs / f"rank{r}.log")))
             for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _join(procs, timeout: float = 900) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _log(logs: Path, rank: int) -> str:
    return (logs / f"rank{rank}.log").read_text()


def _complete_entries(cache: Path) -> dict[str, tuple[int, bytes, bytes]]:
    out = {}
    for side in (cache / "images").glob("*/*.json"):
        png = side.with_suffix(".png")
        if png.exists():
            out[side.stem] = (png.stat().st_mtime_ns, png.read_bytes(), side.read_bytes())
    return out


# ---------------------------------------------------------------------------------------------- the reference
@pytest.fixture(scope="module")
def single(tmp_path_factory, scenario):
    root = tmp_path_factory.mktemp("single")
    cache, out = root / "cache", root / "out"
    assert main(scenario(cache, out)) == 0
    res, rows = _result(out)
    assert {r["role"] for r in rows} == {"target", "mitigated", "utility"} and len(rows) == 2 * 4 * 2 + 2
    assert len(res["attack_traces"]) == 2 and res["mitigation"]["report"]["n_prompts"] == 2
    return (res, rows), (cache, out)


# ---------------------------------------------------------------------------------------------- acceptance 1
def test_two_gloo_ranks_equal_the_single_process_run(tmp_path, scenario, single):
    cache, out, logs = tmp_path / "cache", tmp_path / "out", tmp_path / "logs"
    codes = _join(_launch(scenario(cache, out), logs))
    assert codes == [0, 0], f"exit codes {codes}\nrank 0:\n{_log(logs, 0)[-3000:]}\nrank 1:\n{_log(logs, 1)[-3000:]}"
    shares = []
    for r in (0, 1):
        m = re.search(rf"shard {r}/2 \(rank {r}/2\): (\d+) samples of (\d+) are this shard's: cached 0, remaining "
                      r"(\d+)", _log(logs, r))
        assert m, _log(logs, r)
        shares.append(int(m.group(1)))
        assert re.search(rf"shard {r}/2 \(rank {r}/2\): generated {m.group(1)}, cached before 0, missing 0",
                         _log(logs, r)), _log(logs, r)
    assert sum(shares) == 18 and min(shares) >= 7, shares  # disjoint, balanced by units
    # one attack and one NeMo record per target, each written by the rank that owns the target
    assert len(list((cache / "attacks").rglob("*.safetensors"))) == 2
    assert len(list((cache / "artifacts" / "nemo").glob("*.json"))) >= 2
    got = _result(out)
    assert got[0]["env"]["execution"]["scored_by"].startswith("rank 0")
    print(f"\n[distributed] 2 gloo ranks: {shares} samples per rank; merged result equals the single-process one")
    _assert_same_run(got, single[0], (cache, out), single[1])


# ---------------------------------------------------------------------------------------------- acceptance 2
def test_shards_then_aggregate_equal_the_unsharded_run(tmp_path, scenario, single, cli_inproc):
    cache, out = tmp_path / "cache", tmp_path / "out"
    rc, _, err = cli_inproc(scenario(cache, out, "--shard", "0/2"))
    assert rc == 0, err
    assert not list(out.rglob("*.json")), "a shard wrote a result"
    m = re.search(r"shard 0/2 \(--shard 0/2\): (\d+) samples of 18", err)
    assert m, err
    n0 = int(m.group(1))
    # aggregating too early: one error line with the count of what shard 1 still has to generate
    agg = ["aggregate", *scenario(cache, out)[1:]]
    rc, _, err = cli_inproc(agg)
    assert rc == 2
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"{18 - n0} of 18 samples are not in the cache" in line, err
    rc, _, err = cli_inproc(scenario(cache, out, "--shard", "1/2"))
    assert rc == 0, err
    assert re.search(rf"shard 1/2 \(--shard 1/2\): generated {18 - n0}, cached before 0, missing 0", err), err
    before = _complete_entries(cache)
    rc, _, err = cli_inproc(agg)
    assert rc == 0, err
    assert _complete_entries(cache) == before, "aggregate wrote to the image cache"
    got = _result(out)
    assert got[0]["env"]["execution"]["scored_by"] == "memobench aggregate"
    _assert_same_run(got, single[0], (cache, out), single[1])


# ---------------------------------------------------------------------------------------------- kill and resume
@pytest.fixture(scope="module")
def plain(tiny_pipe, tmp_path_factory):
    """A cheaper pairing (no mitigation, no attack) with more, slower images per rank, for the kill test."""
    cfg = tmp_path_factory.mktemp("plain-config") / "run.json"
    cfg.write_text(json.dumps({"metrics": ["tiny_alignment"], "utility_limit": 2, "utility_seeds": [0]}))

    def args(cache: Path, out: Path) -> list[str]:
        return ["run", "--model", "tiny", "--model-param", f"path={tiny_pipe}", "--config", str(cfg), "--limit", "2",
                "--seeds", "0-7", "--batch-size", "1", "--steps", "6", "--offline", "--no-progress",
                "--cache-dir", str(cache), "-o", str(out)]

    root = tmp_path_factory.mktemp("plain-single")
    assert main(args(root / "cache", root / "out")) == 0
    return args, _result(root / "out"), (root / "cache", root / "out")


def test_killed_rank_resumes_only_its_missing_samples(tmp_path, plain):
    args_of, ref, ref_dirs = plain
    ref_rows = ref[1]
    total = len(ref_rows)
    # rank 1's samples, by the documented rule: units = (role, prompt), dealt round-robin per role
    units: dict[tuple[str, str], list[str]] = {}
    for r in ref_rows:
        units.setdefault((r["role"], r["prompt_id"]), []).append(r["sample_key"])
    names = list(units)
    where = assign_units([units[u] for u in names], 2, groups=[u[0] for u in names])
    rank1 = {k for u, w in zip(names, where) if w == 1 for k in units[u]}
    assert 0 < len(rank1) < total

    cache, out, logs = tmp_path / "cache", tmp_path / "out", tmp_path / "logs1"
    procs = _launch(args_of(cache, out), logs)
    try:
        deadline = time.monotonic() + 600
        n1 = 0
        while time.monotonic() < deadline and procs[1].is_alive():
            n1 = len(rank1 & set(_complete_entries(cache))) if (cache / "images").exists() else 0
            if n1 >= 1:
                break
            time.sleep(0.01)
        assert procs[1].is_alive() and 1 <= n1 < len(rank1), (
            f"rank 1 could not be caught mid-generation ({n1} of its {len(rank1)} images); log:\n{_log(logs, 1)}")
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        codes = _join(procs, timeout=600)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0  # rank 0 finished its own share, then lost its peer at the barrier
    assert "error:" in _log(logs, 0) and "barrier" in _log(logs, 0), _log(logs, 0)
    assert not list(out.rglob("*.json"))
    at_stop = _complete_entries(cache)
    mine0 = set(units_keys := {r["sample_key"] for r in ref_rows}) - rank1
    assert mine0 <= set(at_stop), "rank 0 did not finish its share before the barrier"
    done1 = rank1 & set(at_stop)
    assert len(done1) < len(rank1)

    time.sleep(0.05)
    logs2 = tmp_path / "logs2"
    codes = _join(_launch(args_of(cache, out), logs2))
    assert codes == [0, 0], f"{codes}\n{_log(logs2, 0)[-3000:]}\n{_log(logs2, 1)[-3000:]}"
    assert re.search(rf"rank 0/2\): generated 0, cached before {len(mine0)}, missing 0", _log(logs2, 0))
    assert re.search(rf"rank 1/2\): generated {len(rank1) - len(done1)}, cached before {len(done1)}, missing 0",
                     _log(logs2, 1)), _log(logs2, 1)
    after = _complete_entries(cache)
    assert set(after) == units_keys
    assert all(after[k] == v for k, v in at_stop.items()), "a cached image was rewritten by the re-run"
    print(f"\n[distributed] killed rank 1 with {len(done1)} of its {len(rank1)} images; the re-run generated the "
          f"other {len(rank1) - len(done1)} and nothing of rank 0's {len(mine0)}")
    got = _result(out)
    assert got[1] == ref[1]
    assert _stable(got[0], cache, out) == _stable(ref[0], *ref_dirs)


# ---------------------------------------------------------------------------------------------- units and inputs
def test_unit_assignment_is_a_stable_balanced_partition():
    units = [[f"{role}-{p}-{s}" for s in range(4)] for role in ("t", "u") for p in range(7)]
    groups = [u[0].split("-")[0] for u in units]
    for n in (1, 2, 3, 5):
        where = assign_units(units, n, groups)
        assert assign_units(units[::-1], n, groups[::-1]) == where[::-1]  # independent of listing order
        for g in ("t", "u"):
            counts = [sum(1 for w, gg in zip(where, groups) if gg == g and w == i) for i in range(n)]
            assert max(counts) - min(counts) <= 1, (n, g, counts)
    assert make_shard((1, 3), rank=1, world_size=2).index == 3 and make_shard((1, 3), 1, 2).count == 6


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_spec_is_one_error_line(spec, tiny_args, tmp_path, cli_inproc):
    with pytest.raises(Exception):
        parse_shard(spec)
    rc, _, err = cli_inproc(tiny_args(tmp_path / "c", tmp_path / "o", f"--shard={spec}", "--dry-run"))
    assert rc == 2 and err.count("error:") == 1 and "--shard" in err, err


def test_half_precision_on_cpu_is_refused(tiny_args, tmp_path, cli_inproc):
    for dt in ("fp16", "bf16"):
        rc, _, err = cli_inproc(tiny_args(tmp_path / "c", tmp_path / "o", "--dtype", dt, "--dry-run"))
        assert rc == 2 and err.strip().count("\n") == 0 and "GPU" in err and "--dtype fp32" in err, err
    rc, _, err = cli_inproc(tiny_args(tmp_path / "c", tmp_path / "o", "--dtype", "fp8", "--dry-run"))
    assert rc == 2 and "fp16, bf16 or fp32" in err


def test_write_once_keeps_the_first_complete_file(tmp_path):
    from memobench.cache import write_once_bytes

    p = tmp_path / "a" / "artifact.json"
    assert write_once_bytes(p, b"first") is True
    assert write_once_bytes(p, b"second") is False
    assert p.read_bytes() == b"first" and sorted(x.name for x in p.parent.iterdir()) == ["artifact.json"]
