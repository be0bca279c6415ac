"""Issue 26, item 9 (first use: progress).

* Long per-prompt work reports progress through ``ctx.task``: NeMo's activation statistics and its localization
  rounds per prompt (initial selection candidates, refinement tests), DoRI's steps, advft's regular pairs,
  surrogate draws, epochs (with their DoRI runs nested under them) and Wanda's statistics runs.
* Without a terminal a run prints plain progress lines with counts (at least every 30 s); with one, rich bars, nested
  tasks indented under the task they run in.
* Ctrl-C: the display stops where it stands (no task marked complete), the CLI prints "interrupted — rerun the same
  command to resume (N of M samples kept)" with the real counts and exits 130; the rerun resumes.
* The results table is never clipped at 80 columns without a terminal (full metric names, paths).

Each test failed on the code before the fix (except the DoRI one: DoRI already reported its steps; it guards that).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from memobench import hookimpl
from memobench import progress as P
from memobench.api import Context, Mitigation, Prompt
from memobench.registry import register_object, unregister_object


class Recorder:
    """A stand-in for the progress reporter: records every task (description, total, transient, nesting depth)
    and what was advanced."""

    def __init__(self):
        self.tasks: list[dict] = []
        self._open: list[dict] = []

    @contextlib.contextmanager
    def task(self, description, total, transient=False):
        rec = {"description": description, "total": total, "transient": transient, "advanced": 0, "calls": 0,
               "parent": self._open[-1]["description"] if self._open else None}
        self.tasks.append(rec)
        self._open.append(rec)

        def advance(n=1, **kw):
            rec["advanced"] += n
            rec["calls"] += 1

        try:
            yield advance
        finally:
            self._open.remove(rec)

    def named(self, pattern: str) -> list[dict]:
        return [t for t in self.tasks if re.search(pattern, t["description"])]


# ---------------------------------------------------------------------------------------------- reporter
def test_plain_lines_without_a_terminal_at_least_every_interval():
    """A task that does not advance for longer than the interval still gets lines (the heartbeat), with counts."""
    buf = io.StringIO()
    pr = P.ProgressReporter(True, console=Console(file=buf, width=80), interval=0.05)
    assert pr.plain  # a StringIO is not a terminal
    with pr:
        with pr.task("generate (nemo)", 8) as adv:
            adv(3)
            time.sleep(0.5)  # no advance: e.g. one long UNet call
    lines = buf.getvalue().splitlines()
    assert any(re.fullmatch(r"\[memobench\] generate \(nemo\): 3/8, \d+s elapsed", x) for x in lines), lines
    assert lines[-1].startswith("[memobench] generate (nemo): 8/8, done in "), lines
    assert "━" not in buf.getvalue()  # no rich live display in a log


def test_plain_lines_use_the_clock_and_show_nested_tasks(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(P, "_clock", lambda: now[0])
    buf = io.StringIO()
    pr = P.ProgressReporter(True, console=Console(file=buf, width=80), interval=30.0)
    with pr:
        with pr.task("attack dori + generate (nemo)", 8) as outer:
            outer(2)
            with pr.task("DoRI p1", 50, transient=True) as inner:
                inner(10)
                assert "DoRI" not in buf.getvalue()  # nothing before 30 s
                now[0] += 80
                inner(1)  # 80 s after the last line: one line per open task, outermost first
    lines = buf.getvalue().splitlines()
    assert "[memobench] attack dori + generate (nemo): 2/8, 1m20s elapsed" in lines, lines
    assert "[memobench]   DoRI p1: 11/50, 1m20s elapsed" in lines, lines
    assert lines.index("[memobench]   DoRI p1: 11/50, 1m20s elapsed") == lines.index(
        "[memobench] attack dori + generate (nemo): 2/8, 1m20s elapsed") + 1


def test_terminal_keeps_rich_bars_with_nested_tasks_under_the_outer_one():
    pr = P.ProgressReporter(True, console=Console(file=io.StringIO(), force_terminal=True, width=120))
    assert not pr.plain
    with pr:
        with pr.task("nemo: localize neurons (8 prompts)", 8):
            with pr.task("nemo p1: initial selection [θ, k]", 16, transient=True) as adv:
                adv(2)
                shown = [t.description for t in pr._progress.tasks]
    assert shown == ["nemo: localize neurons (8 prompts)", " └ nemo p1: initial selection [θ, k]"]


def test_ctrl_c_stops_the_display_without_completing_tasks():
    pr = P.ProgressReporter(True, console=Console(file=io.StringIO(), force_terminal=True, width=120))
    with pytest.raises(KeyboardInterrupt):
        with pr:
            prog = pr._progress
            with pr.task("generate (nemo)", 8) as adv:
                adv(3)
                with pr.task("DoRI p4", 50, transient=True) as sub:
                    sub(7)
                    raise KeyboardInterrupt
    assert [(t.description, t.completed, t.total) for t in prog.tasks] == [("generate (nemo)", 3, 8),
                                                                            (" └ DoRI p4", 7, 50)]
    assert not prog.live.is_started


# ---------------------------------------------------------------------------------------------- plugins
@pytest.fixture(scope="module")
def sd14(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    tok = tmp_path_factory.getbasetemp() / "sd-tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


NONMEM = [f"a photo of a {w}" for w in "cat dog house tree car boat bird fish".split()]
TARGETS = [Prompt("m0", "a red square on a blue background", "VM"), Prompt("m1", "portrait of a smiling man", "VM")]


def test_nemo_reports_statistics_and_localization_rounds(sd14, tmp_path):
    from memobench_plugins import nemo as N

    rec = Recorder()
    ctx = Context(cache_dir=tmp_path, nonmem_prompts=NONMEM, progress=rec)
    # every seed passes the filter; candidates fail until θ/k have moved a few times; refinement keeps everything
    m = N.NeMo(samples_per_prompt=3, pairwise_threshold=-1.0, initial_threshold=2.0, refinement_threshold=-1.0,
               k_init=2, theta_step=1.0)
    m.fit(sd14, TARGETS[:1], ctx)
    (stats,) = rec.named(r"^nemo: activation statistics")
    assert stats["total"] == len(NONMEM) and stats["advanced"] == len(NONMEM) and stats["transient"]
    (outer,) = rec.named(r"^nemo: localize neurons")
    assert outer["advanced"] == 1
    (init,) = rec.named(r"^nemo m0: initial selection")
    (ref,) = rec.named(r"^nemo m0: refinement")
    record = m._records[TARGETS[0].sha256]
    assert init["parent"] == ref["parent"] == outer["description"]
    assert init["total"] == len(N.theta_k_schedule(theta_step=1.0, k_init=2)) and init["calls"] == \
        record["n_candidates"] >= 1
    # one unit per non-empty layer and per neuron of the initial sets (the record lists them without repeats)
    assert ref["total"] >= N.refine_total(record["initial"]) > 0
    assert ref["advanced"] == ref["total"]  # every layer test and neuron test, counted


def test_nemo_refine_counts_every_test():
    from memobench_plugins import nemo as N

    calls = []
    sets = [[1, 2, 2], [], [5], [7, 8]]
    # layer 3 (neurons 7, 8) is dropped as a whole; the others are tested neuron by neuron
    out = N.refine(sets, lambda s: 0.0 if s[3] == [] and s[2] == [5] and len(s[0]) == 3 else 1.0, 0.5,
                   advance=lambda n=1: calls.append(n))
    assert sum(calls) == N.refine_total(sets) == 3 + 6
    assert out == [[1, 2, 2], [], [5], []]


def test_wanda_reports_statistics_runs(sd14, tmp_path):
    from memobench_plugins import wanda as W

    rec = Recorder()
    ctx = Context(cache_dir=tmp_path, batch_size=1, progress=rec)
    W.Wanda(skill_ratio=0.1, num_inference_steps=4, timesteps=2).fit(sd14, TARGETS, ctx)
    (stats,) = rec.named(r"^wanda: statistics")
    assert stats["total"] == (len(TARGETS) + 1) * 2 == stats["advanced"]  # targets + base prompt, 2 steps each
    assert stats["calls"] == 3 * 2 and stats["parent"].startswith("wanda: masks")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import torch

    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    return DiffusionModel(tiny_random_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok") / "tokenizer"), "test")


def test_dori_reports_its_steps(small):
    from memobench_plugins.dori import DoRIAttack

    rec = Recorder()
    ctx = Context(cache_dir=Path("."), progress=rec)
    target = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    DoRIAttack(steps=3, batch=1).run(small, TARGETS[0], target, ctx)
    (t,) = rec.tasks
    assert t["description"] == "DoRI m0" and t["total"] == 3 == t["calls"] and t["transient"]
    DoRIAttack(steps=1, batch=1).run(small, TARGETS[0], target, None)  # no context: no progress, no error


def test_advft_reports_regular_pairs_surrogate_draws_and_epochs(small, tmp_path):
    from memobench.registry import get_registry
    from memobench_plugins.advft import AdversarialFineTuning

    reg = get_registry()
    if "dori" not in reg.entries["attack"] or "tiny-general" not in reg.entries["prompt_set"]:
        pytest.skip("built-in plugins not installed as entry points (run `uv sync`)")
    r = small.resolution
    target = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rec = Recorder()
    ctx = Context(cache_dir=tmp_path / "cache", seeds=(0,), registry=reg, references=lambda p: [target],
                  progress=rec, generation={"num_inference_steps": 2, "guidance_scale": 3.0, "height": r, "width": r},
                  model_prompt_sets={"regular": "tiny-general"})
    p0 = Prompt("p0", "a photo of a cat sitting on a red mat", mem_type="VM", reference_ids=("r",))
    AdversarialFineTuning(epochs=1, dori_steps=2, dori_batch=1, steps_per_epoch=2, lr=1e-3, n_regular=2,
                          regular_batch=1, surrogate="none", surrogate_params="", surrogate_tries=2,
                          surrogate_max_sscd=-2.0).fit(small, [p0], ctx)
    (reg_t,) = rec.named(r"^advft: regular pairs")
    assert reg_t["total"] == 2 == reg_t["advanced"]
    (draws,) = rec.named(r"^advft: surrogate draws for p0")
    assert draws["total"] == 2 == draws["advanced"]  # no draw is below SSCD -2: both seeds drawn
    assert draws["parent"].startswith("advft: surrogate images")
    (epochs,) = rec.named(r"^advft: 1 epochs")
    assert epochs["advanced"] == epochs["total"] == 2 + 2  # 2 DoRI runs (inits prompt, gaussian) + 2 steps
    dori = rec.named(r"^DoRI p0")
    assert len(dori) == 2 and all(d["parent"] == epochs["description"] and d["calls"] == 2 for d in dori)


# ---------------------------------------------------------------------------------------------- CLI runs
class SlowFit(Mitigation):
    """Changes nothing; its fit takes 'minutes' (a fake clock) and reports them through ctx.task."""

    name = "issue26-slow"
    version = "0"
    kind = "weights"
    interrupt_at: int | None = None  # Ctrl-C after that many steps

    def fit(self, model, prompts, ctx):
        with ctx.task("issue26 slow fit", 3, transient=False) as adv:
            for i in range(3):
                if i == self.interrupt_at:
                    raise KeyboardInterrupt
                P_clock[0] += 31.0  # 31 s per step
                adv()

    @contextlib.contextmanager
    def apply(self, model, prompt, ctx):
        yield


P_clock = [0.0]


@pytest.fixture
def slow_plugin(monkeypatch):
    P_clock[0] = 5000.0
    monkeypatch.setattr(P, "_clock", lambda: P_clock[0], raising=False)
    plugin = SimpleNamespace(register_mitigations=hookimpl(lambda register: register(SlowFit)))
    register_object(plugin, "issue26-slow")
    try:
        yield
    finally:
        SlowFit.interrupt_at = None
        unregister_object("issue26-slow")


def test_run_without_a_terminal_prints_progress_lines_with_counts(slow_plugin, tmp_path, tiny_args, cli_inproc):
    rc, out, err = cli_inproc(tiny_args(tmp_path / "cache", tmp_path / "out", "--mitigation", "issue26-slow",
                                        "--limit", "1", "--seeds", "0", "--steps", "2"))
    assert rc == 0, err
    lines = err.splitlines()
    for k, s in ((1, "31s"), (2, "1m02s"), (3, "1m33s")):
        assert f"[memobench] issue26 slow fit: {k}/3, {s} elapsed" in lines, err
    assert "[memobench] issue26 slow fit: 3/3, done in 1m33s" in lines, err
    assert "━" not in err


def test_ctrl_c_inside_a_plugin_stops_the_plain_lines_and_keeps_the_counts(slow_plugin, tmp_path, tiny_args,
                                                                          cli_inproc):
    SlowFit.interrupt_at = 2
    rc, out, err = cli_inproc(tiny_args(tmp_path / "cache", tmp_path / "out", "--mitigation", "issue26-slow",
                                        "--limit", "1", "--seeds", "0-2", "--steps", "2"))
    assert rc == 130, err
    lines = err.strip().splitlines()
    assert "[memobench] issue26 slow fit: 2/3, 1m02s elapsed" in lines, err
    assert lines[-1] == "interrupted — rerun the same command to resume (0 of 3 samples kept)", err
    assert "done in" not in err and "3/3" not in err  # the interrupted task is not reported as complete


def test_progress_interval_from_the_environment(monkeypatch, tmp_path, tiny_args, cli_inproc):
    assert P.ProgressReporter(True, console=Console(file=io.StringIO())).interval == P.PLAIN_INTERVAL_S == 30.0
    monkeypatch.setenv("MEMOBENCH_PROGRESS_INTERVAL", "5")
    assert P.ProgressReporter(True, console=Console(file=io.StringIO())).interval == 5.0
    monkeypatch.setenv("MEMOBENCH_PROGRESS_INTERVAL", "0")
    rc, out, err = cli_inproc(tiny_args(tmp_path / "cache", tmp_path / "out", "--limit", "1", "--seeds", "0"))
    assert rc == 2 and err.startswith("error: MEMOBENCH_PROGRESS_INTERVAL='0': not a positive number") \
        and err.count("\n") == 1, err


def _interrupt_after(monkeypatch, k: int):
    from memobench.cache import ImageCache

    put, n = ImageCache.put, [0]

    def put_then_interrupt(self, *a, **kw):
        put(self, *a, **kw)
        n[0] += 1
        if n[0] == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(ImageCache, "put", put_then_interrupt)


def test_ctrl_c_prints_counts_exits_130_and_the_rerun_resumes(monkeypatch, tmp_path, tiny_args, cli_inproc):
    args = tiny_args(tmp_path / "cache", tmp_path / "out", "--limit", "1", "--seeds", "0-3", "--steps", "2",
                     "--batch-size", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich bars on the captured stderr, as on a terminal
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        rc, out, err = cli_inproc(args)
    assert rc == 130, err
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err)
    assert plain.rstrip().splitlines()[-1] == "interrupted — rerun the same command to resume (2 of 4 samples kept)"
    frames = re.findall(r"generate \(none\) [━╺╸ ]+ (\d)/4", plain)
    # the bar stops where the run stopped (1: the second image was written, its batch not counted yet), never 4/4
    assert frames and frames[-1] == "1" and "4/4" not in plain, plain
    monkeypatch.delenv("FORCE_COLOR")
    rc, out, err = cli_inproc([*args, "--no-progress"])
    assert rc == 0 and "cached 2, remaining 2" in err, err


def test_ctrl_c_before_any_sample_was_planned_still_says_how_to_resume(monkeypatch, tmp_path, tiny_args,
                                                                       cli_inproc):
    from memobench import runner

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "_cast", interrupted)  # while the model loads
    rc, out, err = cli_inproc(tiny_args(tmp_path / "cache", tmp_path / "out", "--limit", "1", "--seeds", "0"))
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted — rerun the same command to resume", err


# ---------------------------------------------------------------------------------------------- summary tables
def _fake_outcome(tmp_path):
    impl = {"name": "sscd_disc_mixup", "checkpoint": "sscd_disc_mixup.torchscript.pt (sha256 pinned)"}
    rec = lambda v: {"value": v, "n": 4, "dispersion": {"value": 0.01, "kind": "bootstrap_se"},
                     "higher_is_better": False, "impl": impl,
                     "groups": {"verbatim_memorization": {"value": v, "n": 2}}}
    metrics = {name: rec(0.5) for name in ("mr", "mr_any", "mr_gen", "sscd_orig", "sscd_gen_max")}
    result = {"model": {"plugin": {"name": "tiny"}}, "mitigation": {"name": "nemo"}, "attack": {"name": "dori"},
              "status": "partial", "metrics": metrics, "metrics_without_attack": metrics}
    run_dir = tmp_path / "a-rather-long-results-directory-name" / "tiny" / "nemo__dori"
    return SimpleNamespace(result=result, result_path=run_dir / "0123456789abcdef.json",
                           samples_path=run_dir / "0123456789abcdef.samples.jsonl",
                           grid_path=run_dir / "0123456789abcdef.grid.png")


def test_summary_table_keeps_full_names_on_an_80_column_log(monkeypatch, tmp_path, capsys):
    from memobench.cli import _print_summary

    monkeypatch.setenv("COLUMNS", "80")
    out = _fake_outcome(tmp_path)
    _print_summary(out)
    text = capsys.readouterr().out
    assert "…" not in text, text
    for name in ("mr_any", "sscd_gen_max", "mr_any[verbatim_memorization]", "no attack", "+ dori",
                 "sscd_disc_mixup.torchscript.pt (sha256 pinned)", str(out.result_path), str(out.samples_path)):
        assert name in text, f"{name!r} clipped:\n{text}"
    rows = [x for x in text.splitlines() if "mr_any" in x]
    assert len(rows) == 2  # one row each (no 80-column wrap), metric and its group


def test_matrix_summary_keeps_full_paths_on_an_80_column_log(monkeypatch, tmp_path, tiny_args, cli_inproc):
    monkeypatch.setenv("COLUMNS", "80")
    out_dir = tmp_path / "a-rather-long-results-directory-name-for-the-matrix"
    rc, out, err = cli_inproc([*tiny_args(tmp_path / "cache", out_dir, "--limit", "1", "--seeds", "0", "--steps",
                                          "2", "--no-progress"), "--matrix", "--mitigation", "none", "--attack",
                               "none"])
    assert rc == 0, err
    (result,) = out_dir.rglob("*.json")
    assert json.loads(result.read_text())["mitigation"]["name"] == "none"
    assert "…" not in out and str(result) in out, out
