"""Bad input on the command line: exit code 2 and exactly one line on stderr, ``error: …``, naming the input.

Most cases call ``memobench.cli.main`` in this process (the console script is ``sys.exit(main())``); a few go
through the installed console script in a subprocess as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-input")
    f = {
        "bad_jsonl": d / "bad.jsonl",
        "no_prompt_csv": d / "no_prompt.csv",
        "empty_txt": d / "empty.txt",
        "missing_txt": d / "missing.txt",
        "yaml_prompts": d / "prompts.yaml",
        "bad_json_config": d / "broken_config.json",
        "unknown_key_config": d / "unknown_key.json",
        "missing_config": d / "no_such_config.json",
        "regular_file": d / "a_regular_file",
        "wrong_type_config": d / "wrong_type.json",
    }
    f["wrong_type_config"].write_text(json.dumps({"metrics": [], "prompts": "tiny-nonmem",
                                                  "prompt_params": {"n_general": "many"}}))
    f["bad_jsonl"].write_text('{"prompt": "a red square"}\n{"prompt": oops}\n')
    f["no_prompt_csv"].write_text("name,description\ncat,a cat\ndog,a dog\n")
    f["empty_txt"].write_text("\n   \n\n")
    f["yaml_prompts"].write_text("- a red square\n")
    f["bad_json_config"].write_text('{"metrics": [,]}')
    f["unknown_key_config"].write_text(json.dumps({"metrics": [], "metricz": ["mr"]}))
    f["regular_file"].write_text("not a directory\n")
    f["out"] = d / "out"
    f["cache"] = d / "cache"
    return f


def _run(f, *args) -> list[str]:
    """``memobench run`` with a temp output and cache dir (and no metrics unless a case names one)."""
    return ["run", "-o", str(f["out"]), "--cache-dir", str(f["cache"]), *args]


# (id, argv builder, strings the error line must contain)
CASES = [
    ("unknown-mitigation", lambda f: _run(f, "--mitigation", "nemo2"), ["Unknown mitigation 'nemo2'", "Available:"]),
    ("unknown-attack", lambda f: _run(f, "--attack", "dori2"), ["Unknown attack 'dori2'"]),
    ("unknown-model", lambda f: _run(f, "--model", "tiny2"), ["Unknown model 'tiny2'", "Did you mean: tiny"]),
    ("unknown-metric", lambda f: _run(f, "--metric", "sscd_nope"), ["Unknown metric 'sscd_nope'"]),
    ("unknown-prompt-set", lambda f: _run(f, "--prompts", "tiny-vmm"), ["Unknown prompt set 'tiny-vmm'",
                                                                        "Did you mean: tiny-vm"]),
    ("jsonl-bad-json", lambda f: _run(f, "--prompts", str(f["bad_jsonl"])), ["--prompts", "bad.jsonl line 2",
                                                                              "invalid JSON"]),
    ("csv-no-prompt-column", lambda f: _run(f, "--prompts", str(f["no_prompt_csv"])), ["no_prompt.csv",
                                                                                       "'prompt'"]),
    ("empty-txt", lambda f: _run(f, "--prompts", str(f["empty_txt"])), ["empty.txt", "no prompts"]),
    ("missing-prompt-file", lambda f: _run(f, "--prompts", str(f["missing_txt"])), ["--prompts", "missing.txt",
                                                                                    "not found"]),
    ("unsupported-prompt-file", lambda f: _run(f, "--prompts", str(f["yaml_prompts"])), ["--prompts", ".yaml"]),
    ("seeds-not-a-number", lambda f: _run(f, "--seeds", "abc"), ["--seeds", "'abc'"]),
    ("seeds-empty-range", lambda f: _run(f, "--seeds", "5-2"), ["--seeds", "'5-2'"]),
    ("seeds-negative", lambda f: _run(f, "--seeds", "-3"), ["--seeds", "'-3'"]),
    ("unwritable-output-dir", lambda f: ["run", "-o", str(f["regular_file"] / "sub"), "--cache-dir", str(f["cache"])],
     ["--output-dir", "a_regular_file/sub"]),
    ("model-folder-missing", lambda f: _run(f, "--model-param", "path=/nonexistent/pipeline"),
     ["model 'tiny'", "/nonexistent/pipeline"]),
    ("unknown-plugin-parameter", lambda f: _run(f, "--mitigation-param", "foo=1"),
     ["mitigation 'none' has no parameter foo"]),
    ("plugin-parameter-wrong-type", lambda f: _run(f, "--config", str(f["wrong_type_config"])),
     ["prompt set 'tiny-nonmem' parameter n_general", "'many'"]),
    ("key-value-empty-key", lambda f: _run(f, "--mitigation-param", "=1"), ["--mitigation-param", "'=1'"]),
    ("bad-key-value", lambda f: _run(f, "--model-param", "pathx"), ["--model-param", "KEY=VALUE", "'pathx'"]),
    ("config-missing", lambda f: _run(f, "--config", str(f["missing_config"])), ["--config", "no_such_config.json"]),
    ("config-malformed-json", lambda f: _run(f, "--config", str(f["bad_json_config"])),
     ["--config", "broken_config.json", "cannot parse"]),
    ("config-unknown-key", lambda f: _run(f, "--config", str(f["unknown_key_config"])), ["metricz"]),
    ("limit-negative", lambda f: _run(f, "--limit", "-1"), ["limit", "-1"]),
    ("limit-zero", lambda f: _run(f, "--limit", "0"), ["limit", "0"]),
    ("batch-size-zero", lambda f: _run(f, "--batch-size", "0"), ["batch-size", "0"]),
    ("guidance-negative", lambda f: _run(f, "--guidance", "-1"), ["guidance", "-1"]),
    ("steps-not-an-integer", lambda f: _run(f, "--steps", "abc"), ["--steps"]),
    ("unknown-option", lambda f: _run(f, "--mitigaton", "none"), ["--mitigaton"]),
    ("plugins-dir-not-a-directory", lambda f: ["--plugins-dir", str(f["regular_file"]), "plugins"],
     ["--plugins-dir", "a_regular_file"]),
    ("ls-unknown-kind", lambda f: ["ls", "mitigatons"], ["ls", "'mitigatons'"]),
    ("unknown-command", lambda f: ["runn"], ["'runn'"]),
    ("zoo-unknown-recipe-key", lambda f: ["zoo", "train", "tiny", "--work-dir", str(f["out"] / "zoo"),
                                          "--recipe-param", "prediction=v_prediction"],
     ["--recipe-param", "unknown recipe key 'prediction'"]),
    ("zoo-bad-recipe-value", lambda f: ["zoo", "train", "tiny", "--work-dir", str(f["out"] / "zoo"),
                                        "--recipe-param", "prediction_type=sample"],
     ["recipe prediction_type must be one of epsilon, v_prediction", "'sample'"]),
    ("cache-unknown-section", lambda f: ["cache", "clear", "--cache-dir", str(f["cache"]), "--section", "imgs",
                                         "--yes"], ["--section", "'imgs'"]),
]
SUBPROCESS_CASES = {"steps-not-an-integer", "ls-unknown-kind", "seeds-empty-range"}  # fast: no torch import


def _check(rc: int, out: str, err: str, needles: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit code {rc}; stderr: {err}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ")
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert out == "", f"unexpected stdout: {out}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, files, cli_inproc):
    _, argv, needles = case
    _check(*cli_inproc(argv(files)), needles)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in SUBPROCESS_CASES],
                         ids=[c[0] for c in CASES if c[0] in SUBPROCESS_CASES])
def test_bad_input_console_script(case, files, cli):
    _, argv, needles = case
    res = cli(argv(files))
    _check(res.returncode, res.stdout, res.stderr, needles)


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15


def test_corrupt_cache_entry(tmp_path, tiny_args, cli_inproc):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = tiny_args(cache, out, "--limit", "1", "--seeds", "0-1", "--steps", "2")
    rc, _, err = cli_inproc([*args, "--no-progress"])
    assert rc == 0, err
    pngs = sorted((cache / "images").glob("*/*.png"))
    assert len(pngs) == 2
    png = pngs[0]
    good = png.read_bytes()

    from memobench.cache import png_bytes, read_png

    # a PNG's bytes are checked against its sidecar's sha256 when the image is read (scoring, grid), not all of
    # them at start (issue 25 (4)): the run's progress lines come first, then the one-line error
    def _check_read(rc, out, err, needles):
        lines = [line for line in err.splitlines() if line.strip()]
        assert not any("error" in line for line in lines[:-1]), err
        _check(rc, out, lines[-1] if lines else "", needles)

    png.write_bytes(png_bytes(255 - read_png(png)))  # a valid PNG, but not the one the sidecar records
    # the message names the one entry to delete (the PNG and its sidecar), not the whole cache
    _check_read(*cli_inproc(args), [f"corrupt cache entry {png}", "sha256", "delete this one entry",
                                    str(png.with_suffix(".json"))])

    png.write_bytes(good[: len(good) // 2])  # truncated
    _check_read(*cli_inproc(args), [f"corrupt cache entry {png}"])

    png.write_bytes(good)
    side = png.with_suffix(".json")
    side.write_text("{not json")
    _check(*cli_inproc(args), [f"corrupt cache entry {side}"])


def test_prompt_source_is_a_file_by_suffix_or_path_separator():
    """One rule (memobench.prompts.is_prompt_file) decides file vs prompt-set name for run, detect and locality."""
    from memobench.prompts import is_prompt_file

    assert not is_prompt_file("tiny-vm")
    assert all(is_prompt_file(s) for s in ("mine.txt", "mine.csv", "mine.jsonl", "data/mine", "./x"))
