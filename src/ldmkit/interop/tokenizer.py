"""CLIP's BPE tokenizer files (transformers `CLIPTokenizer`: vocab.json + merges.txt) from and to open_clip's.

open_clip bundles the same byte-level BPE as OpenAI CLIP (49,408 tokens, the last two `<start_of_text>`
and `<end_of_text>`, which transformers names `<|startoftext|>` / `<|endoftext|>`). Importing checks that a
folder's vocabulary is that one; exporting writes it, so no download is needed on either side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldmkit.interop.vae import InteropError

_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def bpe_files() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges in rank order) of open_clip's bundled BPE, in transformers' naming."""
    import open_clip

    tok = open_clip.SimpleTokenizer()
    vocab = {_SPECIAL.get(token, token): int(i) for token, i in tok.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _folder_bpe(folder: Path) -> tuple[dict[str, int], list[str] | None]:
    """(vocabulary, merges or None) of a tokenizer folder: the slow files (vocab.json, merges.txt, as the hub's SD
    folders hold them) or the fast `tokenizer.json` alone (what transformers >= 5 `save_pretrained` writes)."""
    if (folder / "vocab.json").is_file():
        vocab = json.loads((folder / "vocab.json").read_text())
        merges_path = folder / "merges.txt"
        if not merges_path.is_file():
            return vocab, None
        text = merges_path.read_text(encoding="utf-8").splitlines()
        return vocab, [line for line in text if line and not line.startswith("#version")]
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text()).get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise InteropError(f"'{folder / 'tokenizer.json'}' is a {model.get('type')} tokenizer, not CLIP's BPE: only "
                               "CLIP-tokenized models (SD 1.x/2.x) are supported.")
        return model["vocab"], [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    raise InteropError(f"'{folder}' has neither vocab.json nor tokenizer.json: Stable Diffusion's tokenizer/ folder holds "
                       "CLIP's vocab.json and merges.txt (or tokenizer.json); copy it from the model.")


def pad_id_from_tokenizer_folder(folder: Path) -> int:
    """The pad id of an SD `tokenizer/` folder (SD 1.x: `<|endoftext|>` = 49407, SD 2.x: `!` = 0), after checking
    that its vocabulary is CLIP's BPE."""
    vocab, lines = _folder_bpe(folder)
    reference, merges = bpe_files()
    if vocab != reference:
        differ = [k for k in reference if vocab.get(k) != reference[k]][:3]
        raise InteropError(f"the vocabulary of '{folder}' is not CLIP's BPE ({len(vocab)} tokens; differs at {differ}): "
                           "only CLIP-tokenized models (SD 1.x/2.x) are supported.")
    if lines is not None and lines != merges:
        raise InteropError(f"the BPE merges of '{folder}' are not CLIP's: only CLIP-tokenized models are supported.")
    pad = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = pad or _token(json.loads((folder / name).read_text()).get("pad_token"))
    if pad is None:
        return reference["<|endoftext|>"]  # transformers' CLIPTokenizer default
    if pad not in vocab:
        raise InteropError(f"pad_token {pad!r} of '{folder}' is not in its vocabulary.")
    return int(vocab[pad])


def write_tokenizer_folder(folder: Path, pad_id: int, context_length: int = 77) -> None:
    """vocab.json, merges.txt and configs of a transformers `CLIPTokenizer` that pads with `pad_id`."""
    vocab, merges = bpe_files()
    names = {i: t for t, i in vocab.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": names[int(pad_id)]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": int(context_length), "do_lower_case": True,
        "errors": "replace", "add_prefix_space": False, **special}, indent=2))
