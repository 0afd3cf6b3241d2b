"""Write the Hugging Face ``CLIPTokenizer`` files (vocab.json, merges.txt) from the CLIP BPE
vocabulary open_clip ships, so exported diffusers folders carry a tokenizer with no download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def write_clip_tokenizer(folder: str | Path, *, pad: Literal["eos", "zero"], max_length: int = 77) -> None:
    """Write a CLIPTokenizer folder whose padding token matches ``pad``."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    # open_clip names the special tokens <start_of_text>/<end_of_text>; Hugging Face <|...|>
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n",
                                    encoding="utf-8")
    pad_token = "<|endoftext|>" if pad == "eos" else "!"
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))


def read_pad(folder: str | Path) -> Literal["eos", "zero"] | None:
    """The padding convention of a tokenizer folder, or None when it does not say."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad is not None:
                return "eos" if pad == "<|endoftext|>" else "zero"
    return None
