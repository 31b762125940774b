"""BERT WordPiece tokenizers with BLIP's ``[ENC]`` and ``[DEC]`` tokens.

Either built offline from the corpus captions (:func:`train_tokenizer`: deterministic,
no download) or loaded from a local Hugging Face tokenizer folder
(:func:`load_tokenizer`), e.g. the one inside an official BLIP checkpoint.  BLIP puts
``[ENC]`` in place of ``[CLS]`` for image-grounded encoding (ITM) and ``[DEC]`` as the
decoder's start token.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from vlp_core.errors import VlpError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BLIP_TOKENS = ["[DEC]", "[ENC]"]


class TokenizerError(VlpError, ValueError):
    pass


def _with_blip_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    missing = [t for t in BLIP_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    tok.bos_token = "[DEC]"
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    tok.dec_token_id = tok.convert_tokens_to_ids("[DEC]")
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> BertTokenizerFast:
    """Build a lowercase WordPiece tokenizer from ``texts`` (offline, deterministic).

    The vocabulary is a pure function of the captions (the ``tokenizers`` WordPiece trainer
    breaks ties in hash-map order, so two runs on the same captions differ): the special
    tokens, then every character seen and its ``##`` continuation form (sorted), then whole
    words by count (ties alphabetical) up to ``vocab_size``.  Every seen character is in the
    vocabulary, so no caption of ``texts`` needs ``[UNK]``; rarer words split into pieces.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise TokenizerError("cannot train a tokenizer: no non-empty captions")
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    if not counts:
        raise TokenizerError("cannot train a tokenizer: the captions hold no words")
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for token in SPECIAL + BLIP_TOKENS:
        add(token)
    chars = sorted({c for word in counts for c in word})
    for c in chars:
        add(c)
    for c in chars:
        add(f"##{c}")
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        add(word)

    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.WordPiece()
    tk.add_special_tokens(SPECIAL + BLIP_TOKENS)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok = BertTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                            cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)
    return _with_blip_tokens(tok)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved with ``save_pretrained`` (ours, or an HF BLIP checkpoint's)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer folder not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise TokenizerError(f"{path}: cannot load a tokenizer ({exc})") from None
    return _with_blip_tokens(tok)
