"""Issue 26, defect 4: a plugin that raises in a hook or returns the wrong type is one line naming the plugin, the hook
and the exception (exit 1); the full traceback with MEMOBENCH_DEBUG=1; bad input raised by a plugin stays exit 2."""

from __future__ import annotations

import textwrap

import pytest

from memobench.cli import main

PLUGINS = textwrap.dedent('''
    import contextlib
    from dataclasses import dataclass

    from memobench.api import Attack, BadInput, Metric, MetricInfo, Mitigation, PromptSet
    from memobench.data import DataError, DataNotFoundError
    from memobench.hookspecs import hookimpl


    class _M(Mitigation):
        version = "1"
        kind = "inference"

        @dataclass
        class Params:
            pass


    class RaisesInCondition(_M):
        name = "bad-condition"

        def condition(self, model, prompt, cond, latents, ctx):
            return {}["no such key"]


    class WrongType(_M):
        name = "bad-type"

        def condition(self, model, prompt, cond, latents, ctx):
            return "not a Conditioning"


    class RaisesInApply(_M):
        name = "bad-apply"
        kind = "weights"

        @contextlib.contextmanager
        def apply(self, model, prompt, ctx):
            raise ZeroDivisionError("division by zero in the pruning mask")
            yield


    class RaisesOnRestore(_M):
        name = "bad-restore"
        kind = "weights"

        @contextlib.contextmanager
        def apply(self, model, prompt, ctx):
            yield
            raise RuntimeError("could not restore the weights")


    class UserError(_M):
        name = "needs-file"

        def condition(self, model, prompt, cond, latents, ctx):
            raise BadInput("mitigation 'needs-file' parameter path: no such file; pass --mitigation-param path=...")


    class BadAttack(Attack):
        name = "bad-attack"
        version = "1"

        @dataclass
        class Params:
            pass

        def run(self, model, prompt, reference, ctx):
            return None


    class BadMetric(Metric):
        name = "bad-metric"
        version = "1"
        info = MetricInfo("bad-metric", "Bad", higher_is_better=False)

        @dataclass
        class Params:
            pass

        def compute(self, samples, ctx):
            raise IndexError("list index out of range")


    class OfflineMetric(BadMetric):
        name = "offline-metric"

        def compute(self, samples, ctx):
            raise DataNotFoundError("weights.bin is not in the cache and offline mode is on: run once online")


    class PinnedData(PromptSet):
        name = "pinned-data"
        version = "1"

        @dataclass
        class Params:
            pass

        def prompts(self, ctx):
            raise DataError("prompts.csv has sha256 0abc, expected 1def: use the file at the pinned commit")


    @hookimpl
    def register_prompt_sets(register):
        register(PinnedData)


    @hookimpl
    def register_mitigations(register):
        for c in (RaisesInCondition, WrongType, RaisesInApply, RaisesOnRestore, UserError):
            register(c)


    @hookimpl
    def register_attacks(register):
        register(BadAttack)


    @hookimpl
    def register_metrics(register):
        register(BadMetric)
        register(OfflineMetric)
''')


@pytest.fixture
def plugins_dir(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "broken.py").write_text(PLUGINS)
    return d


def _run(tmp_path, plugins_dir, capsys, *extra):
    args = ["--plugins-dir", str(plugins_dir), "run", "--seeds", "0", "--limit", "1", "--steps", "1", "--no-progress",
            "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "o"), *extra]
    rc = main(args)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    return rc, err


@pytest.mark.parametrize("mitigation,needles", [
    ("bad-condition", ["mitigation 'bad-condition'", "condition()", "KeyError", "no such key"]),
    ("bad-type", ["mitigation 'bad-type'", "condition()", "returned str, expected Conditioning"]),
    ("bad-apply", ["mitigation 'bad-apply'", "apply()", "ZeroDivisionError", "pruning mask"]),
    ("bad-restore", ["mitigation 'bad-restore'", "apply() on exit", "RuntimeError", "restore the weights"]),
])
def test_mitigation_faults_are_one_line_naming_plugin_and_hook(tmp_path, plugins_dir, capsys, mitigation, needles):
    rc, err = _run(tmp_path, plugins_dir, capsys, "--mitigation", mitigation, "--metric", "mr")
    assert rc == 1 and len(err) == 1, err
    assert all(n in err[0] for n in needles), err[0]
    assert "MEMOBENCH_DEBUG=1" in err[0]


def test_attack_wrong_type(tmp_path, plugins_dir, capsys):
    rc, err = _run(tmp_path, plugins_dir, capsys, "--attack", "bad-attack", "--metric", "mr")
    assert rc == 1 and len(err) == 1 and "attack 'bad-attack' failed in run(): returned NoneType" in err[0], err


def test_metric_fault_recorded_naming_the_plugin(tmp_path, plugins_dir, capsys):
    rc, err = _run(tmp_path, plugins_dir, capsys, "--metric", "mr", "--metric", "bad-metric")
    assert rc == 1  # the run's other metrics are kept; the failure is in the result's errors and printed
    assert any("metric 'bad-metric' failed in compute(): IndexError" in e for e in err), err


def test_bad_input_from_a_plugin_stays_exit_2(tmp_path, plugins_dir, capsys):
    rc, err = _run(tmp_path, plugins_dir, capsys, "--mitigation", "needs-file", "--metric", "mr")
    assert rc == 2 and err == ["error: mitigation 'needs-file' parameter path: no such file; pass "
                               "--mitigation-param path=..."], err


def test_debug_shows_the_traceback(tmp_path, plugins_dir, capsys, monkeypatch):
    from memobench.boundary import PluginFailure

    monkeypatch.setenv("MEMOBENCH_DEBUG", "1")
    with pytest.raises(PluginFailure) as e:
        _run(tmp_path, plugins_dir, capsys, "--mitigation", "bad-condition", "--metric", "mr")
    assert isinstance(e.value.__cause__, KeyError)  # the plugin's own frames are in the chained traceback


def test_a_metric_that_cannot_get_its_data_is_recorded_and_the_run_goes_on(tmp_path, plugins_dir, capsys):
    """A data error inside a metric is recorded in the result (as before the plugin boundary); the other metrics and
    the result file survive."""
    rc, err = _run(tmp_path, plugins_dir, capsys, "--metric", "mr", "--metric", "offline-metric", "--json")
    assert rc == 1
    assert any("metric 'offline-metric' failed in compute(): DataNotFoundError: weights.bin" in e for e in err), err
    assert list((tmp_path / "o").rglob("*.samples.jsonl"))


def test_a_data_error_of_a_prompt_set_is_bad_input(tmp_path, plugins_dir, capsys):
    """DataError carries its own one-line fix: exit 2 and that line, not 'a fault of that plugin'."""
    rc, err = _run(tmp_path, plugins_dir, capsys, "--prompts", "pinned-data", "--metric", "mr")
    assert rc == 2 and err == ["error: prompts.csv has sha256 0abc, expected 1def: use the file at the pinned "
                               "commit"], err
