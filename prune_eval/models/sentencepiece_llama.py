"""LLaMA's slow sentencepiece tokenizer, as LLaVA-1.5 runs it (transformers 4.37.2, `use_fast=False`).

LLaVA pins transformers==4.37.2 and sentencepiece==0.1.99 and loads its tokenizer with
`AutoTokenizer.from_pretrained(model_path, use_fast=False)` (haotian-liu/LLaVA: pyproject.toml,
llava/model/builder.py): the slow `LlamaTokenizer`, which runs the checkpoint's `tokenizer.model`
through the `sentencepiece` library. transformers 5 no longer has that class (its `LlamaTokenizer` is
a conversion to the `tokenizers` BPE backend), so this module re-implements the parts of 4.37.2's
`LlamaTokenizer` (+ `PreTrainedTokenizer.tokenize/_decode`) that evaluation uses, on `sentencepiece`:

- encode: the text is split on the special tokens (`<unk>`, `<s>`, `</s>`: no stripping around them)
  and each piece in between goes through `sp_model.encode`.
  `legacy=True` (4.37's default when tokenizer_config.json has no `legacy` key): the model's dummy
  prefix applies to every piece, also right after a special token.
  `legacy=False`: the dummy prefix is switched off in the model proto (needs `protobuf`, as 4.37 did),
  "▁" is prepended once to the whole text (and dropped again if a special token follows it), and a
  piece starting with "▁"/" " is encoded after "<unk>" whose tokens are then cut off, so the leading
  space survives. The two settings differ only in text that follows a special token; LLaVA's POPE
  prompt has none (tests/test_original_checkpoint.py checks both give the same ids).
- `add_bos_token` (default True) prepends BOS, `add_eos_token` (default False) appends EOS.
- decode: special ids dropped with `skip_special_tokens`, a leading "▁" of the first token removed,
  runs of ordinary pieces `sp_model.decode`d, special tokens written as text in between (with a space
  before them in legacy mode), no clean-up of spaces (LLaVA's tokenizer_config says
  clean_up_tokenization_spaces: false).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import BatchEncoding

from prune_eval.errors import PruneEvalError

SPIECE_UNDERLINE = "▁"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class SentencePieceLlamaTokenizer:
    """The slow LLaMA tokenizer of transformers 4.37.2 (what LLaVA-1.5's code tokenizes with)."""

    def __init__(
        self,
        vocab_file: str | Path,
        *,
        legacy: bool = True,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str | None = None,
    ) -> None:
        import sentencepiece as spm

        self.vocab_file = str(vocab_file)
        self.legacy, self.add_bos_token, self.add_eos_token = legacy, add_bos_token, add_eos_token
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.sp_model = spm.SentencePieceProcessor()
        if legacy:
            self.sp_model.Load(self.vocab_file)
        else:  # 4.37 LlamaTokenizer.get_spm_processor: the same model without the dummy prefix
            try:
                from sentencepiece import sentencepiece_model_pb2
            except ImportError:
                raise PruneEvalError("tokenizer_config.json says legacy: false; that tokenizer needs the protobuf package: pip install protobuf") from None
            proto = sentencepiece_model_pb2.ModelProto.FromString(Path(self.vocab_file).read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_model.LoadFromSerializedProto(proto.SerializeToString())
        special = [t for t in (unk_token, bos_token, eos_token, pad_token) if t is not None]
        unknown = [t for t in special if self.sp_model.piece_to_id(t) == self.sp_model.unk_id() and t != unk_token]
        if unknown:
            raise PruneEvalError(f"special token(s) {', '.join(unknown)} are not in {self.vocab_file}; added tokens are not supported")
        self.all_special_tokens = list(dict.fromkeys(special))
        self.all_special_ids = [self.sp_model.piece_to_id(t) for t in self.all_special_tokens]

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "SentencePieceLlamaTokenizer":
        """From a checkpoint folder with tokenizer.model and (optionally) tokenizer_config.json."""
        folder = Path(folder)
        if not (folder / "tokenizer.model").is_file():
            raise PruneEvalError(f"{folder} has no tokenizer.model (LLaMA's sentencepiece model); the original LLaVA checkpoint ships one")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text()))
        added = {int(i): _token_text(t) for i, t in (config.get("added_tokens_decoder") or {}).items()}
        tokenizer = cls(
            folder / "tokenizer.model",
            legacy=config.get("legacy") if config.get("legacy") is not None else True,
            add_bos_token=config.get("add_bos_token", True),
            add_eos_token=config.get("add_eos_token", False),
            bos_token=_token_text(config.get("bos_token")) or "<s>",
            eos_token=_token_text(config.get("eos_token")) or "</s>",
            unk_token=_token_text(config.get("unk_token")) or "<unk>",
            pad_token=_token_text(config.get("pad_token")),
        )
        beyond = {i: t for i, t in added.items() if i >= tokenizer.vocab_size}
        if beyond:
            raise PruneEvalError(f"{folder}: added tokens beyond the sentencepiece vocabulary ({beyond}) are not supported")
        return tokenizer

    # --- ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.sp_model.piece_to_id(token)

    @property
    def bos_token_id(self) -> int:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    def convert_tokens_to_ids(self, tokens):
        return self._id(tokens) if isinstance(tokens, str) else [self._id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self.sp_model.id_to_piece(ids)
        return [self.sp_model.id_to_piece(i) for i in ids if not (skip_special_tokens and i in self.all_special_ids)]

    # --- encode --------------------------------------------------------------------------------
    def _split_special(self, text: str) -> list[str]:
        """PreTrainedTokenizer.tokenize's trie split: special tokens become their own items."""
        parts, start, i = [], 0, 0
        by_length = sorted(self.all_special_tokens, key=len, reverse=True)
        while i < len(text):
            match = next((t for t in by_length if text.startswith(t, i)), None)
            if match is None:
                i += 1
                continue
            parts += [text[start:i], match]
            i = start = i + len(match)
        parts.append(text[start:])
        return [p for p in parts if p]

    def _tokenize(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(text, out_type=str)
        unk_length = len(self.sp_model.encode(self.unk_token))
        tokens = self.sp_model.encode(self.unk_token + text, out_type=str)
        return tokens[unk_length:] if len(tokens) >= unk_length else tokens

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens = []
        for part in self._split_special(text):
            tokens += [part] if part in self.all_special_tokens else self._tokenize(part)
        if not self.legacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.sp_model.piece_to_id(t) for t in self.tokenize(text)]
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> BatchEncoding:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})

    # --- decode --------------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        tokens = list(tokens)
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        pieces: list[str] = []
        out, previous_special = "", False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not previous_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(pieces) + token
                previous_special, pieces = True, []
            else:
                pieces.append(token)
                previous_special = False
        return out + self.sp_model.decode(pieces)

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        tokens = self.convert_ids_to_tokens(list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.convert_tokens_to_string(tokens) if tokens else ""

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def save_pretrained(self, folder: str | Path) -> None:
        """tokenizer.model and a tokenizer_config.json that reload to the same behaviour."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(Path(self.vocab_file).read_bytes())
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": self.legacy, "add_bos_token": self.add_bos_token,
                  "add_eos_token": self.add_eos_token, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "unk_token": self.unk_token, "pad_token": self.pad_token, "clean_up_tokenization_spaces": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
