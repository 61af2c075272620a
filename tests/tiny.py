"""Tiny random-weight models built locally (no Hub), saved to a folder and loaded by path.

Shared by the test suite and scripts: a WordPiece tokenizer over a small word list, a 2-4 layer
BERT (encoder, CLS/mean pooling) and a tiny Qwen2 (decoder, last-token pooling, left padding).
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a an of to and in is was for on that with as by it at from be this are or which his her "
    "he she they we you i not but have has had were their one all there been more when who will "
    "would can if no out so up what about into than them its only other some time could these two "
    "may first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three cat dog house car tree water fire book music "
    "river city road small large red blue green happy sad fast slow play run walk eat drink sleep "
    "sun moon star sky sea ship bird fish horse king queen war peace love hate light dark night"
).split()


def _bert_tokenizer(path: Path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(
        "abcdefghijklmnopqrstuvwxyz.,!?'-0123456789"
    )
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))})
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    return tok


def _qwen2_tokenizer(path: Path):
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS + WORDS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, padding_side="left")
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    return tok


def make_tiny_bert(
    path: str | Path, *, layers: int = 2, hidden: int = 32, seed: int = 0, dropout: float = 0.1
) -> Path:
    """Save a random-weight BERT (``hidden`` wide, ``layers`` deep) and its tokenizer to ``path``."""
    import torch
    from transformers import BertConfig, BertModel

    path = Path(path)
    tok = _bert_tokenizer(path)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    return path


def make_tiny_qwen2(path: str | Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Save a random-weight Qwen2 decoder with a left-padding byte-level BPE tokenizer to ``path``."""
    import torch
    from transformers import Qwen2Config, Qwen2Model

    path = Path(path)
    tok = _qwen2_tokenizer(path)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2Model(config).save_pretrained(path)
    return path


TEXTS = [
    "the cat sat on the house",
    "a dog runs in the city",
    "the river is long and blue",
    "people eat and drink at night",
    "the king and the queen of the sea",
    "music of the stars in the sky",
    "a small red car on the road",
    "good books make life great",
    "birds fly over the green tree",
    "the sun and the moon",
    "war and peace",
    "a horse came back from the old city",
    "fish in the water",
    "she walks to work each day",
    "they play music in the house",
    "the ship was slow",
    "he had three dogs",
    "love and hate",
    "fire in the dark night",
    "the last year of the war",
]
