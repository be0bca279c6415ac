"""Stable Diffusion's exact CLIP tokenizer, built offline from the BPE merges that open_clip ships.

SD v1.x uses ``openai/clip-vit-large-patch14``'s tokenizer: byte-level BPE with 49,152 merges, vocabulary
of 49,408 ids (256 byte symbols, 256 ``</w>`` symbols, 48,894 merges, ``<|startoftext|>`` = 49406,
``<|endoftext|>`` = 49407), context length 77, padding with ``<|endoftext|>``. open_clip ships the same merge
list (``bpe_simple_vocab_16e6.txt.gz``); writing it out as ``vocab.json`` + ``merges.txt`` gives a
``transformers.CLIPTokenizer`` whose ids equal SD v1.4's without any download.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte → printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_sd_tokenizer_files(out_dir: str | Path, pad_token: str = EOS) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``.

    ``pad_token`` is ``<|endoftext|>`` for SD v1.x; SD v2.x pads with ``"!"`` (id 0).
    """
    import open_clip.tokenizer as oct

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    cfg = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
           "add_prefix_space": False, "errors": "replace"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def load_sd_tokenizer(cache_dir: str | Path, pad_token: str = EOS):
    """Return a ``transformers.CLIPTokenizer`` equal to SD v1.4's (built into ``cache_dir`` on first use).

    A folder that already holds a saved tokenizer (``tokenizer.json``, e.g. a pipeline's ``tokenizer/``) is only
    read, never written: writing there would change the pipeline's files and so its weights hash."""
    from transformers import CLIPTokenizer

    d = Path(cache_dir)
    if not (d / "merges.txt").exists() and not (d / "tokenizer.json").exists():
        write_sd_tokenizer_files(d, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(str(d))
