"""Regenerate the byte-level tokenizer shipped in runner/local/assets/tokenizer/.

    .venv/bin/python -m runner.local.build_tokenizer

Design: token id b (0..255) is the raw byte b, so every UTF-8 string has exactly
one token per byte (digit strings: one token per digit, which the reversal demo
relies on) and the engine can turn ids back into bytes without the tokenizer
(stop strings). Three special tokens follow, then the chat template is Qwen's
ChatML shape. Nothing here needs the network; the output is deterministic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 256, 257, 258

# ChatML, as the Qwen family uses it, without tools or thinking blocks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def byte_alphabet() -> list[str]:
    """The printable stand-in character for each byte 0..255, in byte order.

    This is the usual byte-level BPE convention (the one the `ByteLevel`
    pre-tokenizer and decoder use): printable Latin-1 bytes stand for themselves,
    the other bytes are shifted to code points from 256 up, in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    shifted = 0
    chars = []
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def build_tokenizer():
    """The `tokenizers.Tokenizer`: a merge-free byte-level BPE, ids 0..255 = bytes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges, word splitting would change nothing but cost time.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    return tokenizer


def write_assets(out_dir: Path = ASSET_DIR) -> Path:
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    _widen_compatibility(out_dir)
    _check(out_dir)
    return out_dir


def _widen_compatibility(out_dir: Path) -> None:
    """Make the config readable by transformers 4.x as well as 5.x.

    transformers 5 writes the template to chat_template.jinja and names its own
    backend class; 4.x clients look for the template inside tokenizer_config.json
    and know the class as PreTrainedTokenizerFast (which 5.x still resolves).
    """
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config["added_tokens_decoder"] = {
        str(256 + i): {"content": tok, "special": True, "lstrip": False, "rstrip": False,
                       "normalized": False, "single_word": False}
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check(out_dir: Path) -> None:
    """Fail loudly if the saved files do not load back with the promised layout."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert len(tok) == 256 + len(SPECIAL_TOKENS), len(tok)
    assert tok.encode("0123", add_special_tokens=False) == [ord(c) for c in "0123"]
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [256, 257, 258]
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    text = "héllo ✓"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "12"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\n12<|im_end|>\n<|im_start|>assistant\n", prompt


def main() -> int:
    path = write_assets()
    print(json.dumps({"tokenizer_path": str(path), "files": sorted(p.name for p in path.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
