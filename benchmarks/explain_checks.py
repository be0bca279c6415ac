"""Issue 10's figures on the embedded model, by one command: which token does `memobench explain` rank first for
each verbatim-memorized prompt, and does removing / replacing it lower the statistic and the SSCD?

    python benchmarks/explain_checks.py [--out benchmarks/reports/explain_checks]

"Distinctive caption words" are defined programmatically: the words of a memorized caption that occur in no other
training caption of the embedded model (the other memorized captions and the whole general-set grammar), function
words excluded. The top token counts as distinctive when its text is a piece of one of those words (BPE may split a
word; each token is mapped to its word by position). Stricter, also reported: the top token belongs to the photo's
name (the item key, e.g. "astronaut"). The detection
AUC of the verdict is read from the calibration that `memobench detect --model tiny` stored (run that first; the
script says so when it is missing). Writes JSON + Markdown and prints the Markdown.

Every prompt is explained twice: with the reference's significance (w.r.t. the text encoder's output rows, the
default) and with ``attribution=token_embeds`` (w.r.t. the encoder's input token embeddings); the second tests the
explanation of why the first ranks function words high on the embedded model (its frozen random CLIP encoder is
causal, so an output row after the distinctive words also carries them). Same trajectory, same calibration.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from memobench.cache import atomic_write_text


FUNCTION_WORDS = {"a", "an", "the", "of", "in", "on", "at", "to", "up", "and", "with", "by", "for"}


def distinctive_words() -> dict[str, set[str]]:
    """Per memorized caption: its words that no other training caption of the embedded model contains."""
    from memobench_plugins.tiny import data as D

    words = lambda c: set(re.findall(r"[a-z0-9]+", c.lower()))  # noqa: E731
    mem = [it.caption for it in D.VM_ITEMS + D.TM_ITEMS]
    general = set().union(*(words(c) for c in D.train_captions()))
    out = {}
    for c in mem:
        others = general.union(*(words(o) for o in mem if o != c))
        out[c] = words(c) - others - FUNCTION_WORDS
    return out


def token_words(tokenizer, caption: str) -> list[str]:
    """The caption word each prompt token belongs to, in token order (position 1 = first prompt token): every word
    is tokenized on its own, and CLIP's BPE tokenizes a lower-case caption as the concatenation of its words."""
    out = []
    for w in caption.lower().split():
        out += [re.sub(r"[^a-z0-9]", "", w)] * len(tokenizer(w, add_special_tokens=False).input_ids)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-set", default="tiny-vm")
    ap.add_argument("--model-param", action="append", help="KEY=VALUE for the tiny model plugin (e.g. path=DIR)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="benchmarks/reports/explain_checks")
    a = ap.parse_args(argv)
    from memobench.config import parse_kv
    from PIL import Image

    from memobench_plugins.detect.bench import load_prompts
    from memobench_plugins.detect.explain import VERDICT_MEM, Explainer, render_png

    t0 = time.time()
    ex = Explainer(model="tiny", model_params=parse_kv(a.model_param, "--model-param"), cache_dir=a.cache_dir,
                   offline=True)
    if ex.calibration is None:
        raise SystemExit("error: no detection calibration for model 'tiny'; run `memobench detect --model tiny "
                         "--memorized tiny-vm --nonmemorized tiny-nonmem` (with the same --model-param) first")
    _, prompts, ps = load_prompts(ex.session, a.prompt_set, "--prompt-set")
    dw = distinctive_words()
    from memobench_plugins.tiny import data as D

    names = {it.caption: {it.key} for it in D.VM_ITEMS + D.TM_ITEMS}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from memobench.sscd import PRESETS

    tau = PRESETS[ex.sscd_preset].threshold  # the copy threshold of the SSCD preset (dori2026: 0.7)
    ex_in = Explainer(model="tiny", detector_params={"attribution": "token_embeds"}, session=ex.session)

    def summary(e, p) -> dict:
        top = e.top_tokens(1)[0]
        words = token_words(ex.session.model.tokenizer, p.text)
        if len(words) != len(e.tokens):
            raise SystemExit(f"error: cannot map the tokens of {p.text!r} to its words")
        top_word = words[top.position - 1]
        abl = {x.kind: x for x in e.ablations}
        return {
            "top_token": top.text, "top_word": top_word, "top_share": top.share,
            "top_is_distinctive": top_word in dw.get(p.text, set()),
            "top_is_name": top_word in names.get(p.text, set()),
            **{f"{k}_statistic": x.statistic for k, x in abl.items()},
            **{f"{k}_sscd_mean": x.sscd_mean for k, x in abl.items()},
            **{f"{k}_lowers_statistic": x.lowers_statistic for k, x in abl.items()},
            **{f"{k}_lowers_sscd": x.lowers_sscd for k, x in abl.items()},
            **{f"{k}_below_copy_threshold": (x.sscd_mean is not None and x.sscd_mean <= tau) for k, x in abl.items()},
            "statements": e.statements,
        }

    rows = []
    for p in prompts:
        e = ex.explain(p, prompt_set=ps)
        e_in = ex_in.explain(p, prompt_set=ps)
        rows.append({"prompt": p.text, "distinctive_words": sorted(dw.get(p.text, ())),
                     "statistic": e.statistic, "verdict": e.verdict, "sscd_mean": e.sscd_mean,
                     **summary(e, p), "token_embeds": summary(e_in, p)})
        Image.fromarray(render_png(e)).save(out.parent / f"explain_{p.id}.png")
        Image.fromarray(render_png(e_in)).save(out.parent / f"explain_{p.id}_token_embeds.png")
    n = len(rows)
    frac = lambda k, rs=rows: sum(bool(r.get(k)) for r in rs) / n if n else None  # noqa: E731
    rows_in = [r["token_embeds"] for r in rows]
    cal = ex.calibration
    doc = {"prompt_set": a.prompt_set, "n": n, "rows": rows,
           "top_token_distinctive_fraction": frac("top_is_distinctive"), "top_token_name_fraction": frac("top_is_name"),
           "memorized_verdict_fraction": sum(r["verdict"] == VERDICT_MEM for r in rows) / n if n else None,
           "remove_lowers_statistic": frac("remove_lowers_statistic"), "remove_lowers_sscd": frac("remove_lowers_sscd"),
           "replace_lowers_statistic": frac("replace_lowers_statistic"),
           "replace_lowers_sscd": frac("replace_lowers_sscd"),
           "copy_threshold": tau, "remove_below_copy_threshold": frac("remove_below_copy_threshold"),
           "replace_below_copy_threshold": frac("replace_below_copy_threshold"),
           "detection": {"auc": cal.get("auc"), "memorized": cal["memorized"]["name"],
                         "nonmemorized": cal["nonmemorized"]["name"], "threshold_rule": ex.threshold_rule},
           "token_embeds": {k: frac(k, rows_in) for k in ("top_is_distinctive", "top_is_name",
                                                          "remove_lowers_statistic", "remove_lowers_sscd",
                                                          "replace_lowers_statistic", "replace_lowers_sscd",
                                                          "remove_below_copy_threshold",
                                                          "replace_below_copy_threshold")},
           "seeds": list(ex.detector.params.seeds), "wall_seconds": time.time() - t0}
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    md = [f"`memobench explain` on `{a.prompt_set}` (embedded model, seeds {doc['seeds']}; {doc['wall_seconds']:.0f} s)",
          "", f"- top-ranked token is a distinctive caption word: {f(doc['top_token_distinctive_fraction'])} of prompts "
          f"(the photo's name: {f(doc['top_token_name_fraction'])})",
          f"- removing it lowers the statistic / the SSCD: {f(doc['remove_lowers_statistic'])} / "
          f"{f(doc['remove_lowers_sscd'])}; replacing it (by '{ex.replacement}'): "
          f"{f(doc['replace_lowers_statistic'])} / {f(doc['replace_lowers_sscd'])}; the edited prompt is no longer "
          f"a copy (mean SSCD ≤ {tau:g}) after removing / replacing: {f(doc['remove_below_copy_threshold'])} / "
          f"{f(doc['replace_below_copy_threshold'])}",
          f"- with `attribution=token_embeds` (input token embeddings): top token distinctive "
          f"{f(doc['token_embeds']['top_is_distinctive'])} (the photo's name: {f(doc['token_embeds']['top_is_name'])}"
          f"); removing it lowers the statistic / the SSCD: {f(doc['token_embeds']['remove_lowers_statistic'])} / "
          f"{f(doc['token_embeds']['remove_lowers_sscd'])}; replacing it: "
          f"{f(doc['token_embeds']['replace_lowers_statistic'])} / {f(doc['token_embeds']['replace_lowers_sscd'])}"
          f"; no longer a copy: {f(doc['token_embeds']['remove_below_copy_threshold'])} / "
          f"{f(doc['token_embeds']['replace_below_copy_threshold'])}",
          f"- verdict 'likely memorized': {f(doc['memorized_verdict_fraction'])} of prompts",
          f"- verdict threshold from `memobench detect` ({doc['detection']['memorized']} vs "
          f"{doc['detection']['nonmemorized']}): AUC {f(doc['detection']['auc'])}", "",
          "| prompt | top token [its word] (share) | distinctive words | verdict | statistic: own → removed → replaced | "
          "SSCD: own → removed → replaced | token_embeds: top token [word] (share) | token_embeds: statistic "
          "removed → replaced | token_embeds: SSCD removed → replaced |", "|---|---|---|---|---|---|---|---|---|"]
    top = lambda r: (f"{r['top_token']} [{r['top_word']}] ({r['top_share']:.2f})"  # noqa: E731
                     f"{' ✓' if r['top_is_distinctive'] else ''}")
    for r in rows:
        ri = r["token_embeds"]
        md.append(f"| {r['prompt']} | {top(r)} | {', '.join(r['distinctive_words'])} | {r['verdict']} | "
                  f"{f(r['statistic'])} → {f(r.get('remove_statistic'))} → {f(r.get('replace_statistic'))} | "
                  f"{f(r['sscd_mean'])} → {f(r.get('remove_sscd_mean'))} → {f(r.get('replace_sscd_mean'))} | "
                  f"{top(ri)} | {f(ri.get('remove_statistic'))} → {f(ri.get('replace_statistic'))} | "
                  f"{f(ri.get('remove_sscd_mean'))} → {f(ri.get('replace_sscd_mean'))} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
