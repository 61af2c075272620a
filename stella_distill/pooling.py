"""Pooling, prompts and Hugging Face model loading shared by teachers and the student."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stella_distill.errors import UserError, first_line
from stella_distill.hub import dense_location, looks_local, offline_hint

POOLINGS = ("cls", "mean", "last_token")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` into one vector per text ``(B, H)``.

    - ``cls``: the first token's state (BERT/gte-large style; assumes right padding or no padding
      on the first position, which is what every BERT-like tokenizer produces).
    - ``mean``: mean over the tokens where ``attention_mask`` is 1 (sentence-transformers' mean).
    - ``last_token``: the state of the last real token of each row, found from the mask, so it is
      correct under left padding (gte-Qwen2's setting) and right padding alike.
    """
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return summed / counts
    if mode == "last_token":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}; expected one of {', '.join(POOLINGS)}")


# No token spans anywhere near this many characters (WordPiece turns any word over 100 characters into
# one [UNK]; BPE vocabularies hold pieces of a few dozen at most), so cutting a text at
# max_length * CHARS_PER_TOKEN characters never changes its first max_length tokens, while a
# pathological text (a 50 MB line) no longer makes the tokenizer take gigabytes.
CHARS_PER_TOKEN = 1000


def with_prompt(texts: list[str], prompt: str, max_length: int | None = None) -> list[str]:
    """Prefix every text with ``prompt``; with ``max_length`` (tokens), first cut each text to
    ``max_length * CHARS_PER_TOKEN`` characters (far more than that many tokens can cover)."""
    if max_length is not None:
        limit = int(max_length) * CHARS_PER_TOKEN
        texts = [t if len(t) <= limit else t[:limit] for t in texts]
    return [prompt + t for t in texts] if prompt else list(texts)


def _needs_remote_code(name_or_path: str) -> bool:
    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("auto_map"))
    except (OSError, ValueError):
        return False


def load_tokenizer(name_or_path: str, *, revision: str | None, trust_remote_code: bool, field: str):
    """``AutoTokenizer.from_pretrained`` with a clear error naming the config field on failure."""
    from transformers import AutoTokenizer

    return _load(
        AutoTokenizer.from_pretrained,
        name_or_path,
        field=field,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )


def load_backbone(
    name_or_path: str,
    *,
    revision: str | None,
    trust_remote_code: bool,
    field: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
):
    """``AutoModel.from_pretrained`` (safetensors preferred) with clear errors for user mistakes.

    ``field`` is the config field that named the model (``teachers.0.model``); every error names it.
    """
    from transformers import AutoModel

    if not trust_remote_code and _needs_remote_code(name_or_path):
        raise UserError(
            f"{field}: {name_or_path} asks to run its own Python code (auto_map in config.json); "
            f"set trust_remote_code: true next to it only if you trust that code"
        )
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return _load(AutoModel.from_pretrained, name_or_path, field=field, **kwargs)
    except UserError as exc:
        text = str(exc).lower()
        if attn_implementation and any(
            k in text for k in ("attn_implementation", "sdpa", "attention implementation")
        ):
            # an architecture without that kernel (e.g. MPNet has no SDPA): use its default one
            kwargs.pop("attn_implementation", None)
            return _load(AutoModel.from_pretrained, name_or_path, field=field, **kwargs)
        raise


def _load(fn, name_or_path: str, *, field: str, **kwargs):
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        # from_pretrained would answer with a confusing "Repo id must be in the form ..." error
        raise UserError(f"{field}: {name_or_path}: no such model folder (Hub model ids look like org/name)")
    try:
        return fn(name_or_path, **kwargs)
    except OSError as exc:
        first = first_line(exc)
        hint = offline_hint()
        raise UserError(f"{field}: cannot load {name_or_path!r}: {first}{hint}") from None
    except ValueError as exc:
        text = " ".join(str(exc).split())
        if "trust_remote_code" in text:
            raise UserError(
                f"{field}: {name_or_path} needs trust_remote_code: true (it runs the model's own code)"
            ) from None
        raise UserError(f"{field}: cannot load {name_or_path!r}: {text[:300]}") from None


def dense_class() -> type:
    """sentence-transformers' ``Dense`` module class (its home moved in sentence-transformers 6)."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Dense
    return Dense


def load_dense(
    model: str, dense: str, *, revision: str | None, trust_remote_code: bool, field: str
) -> torch.nn.Module:
    """The sentence-transformers ``Dense`` module named by ``teachers.N.dense``, in float32, eval mode.

    Loaded with sentence-transformers' own loader (config.json + safetensors or pytorch_model.bin,
    local folder or Hub repository, HF cache offline), so a released model's head (e.g.
    stella_en_1.5B_v5's ``2_Dense_8192``) is applied exactly as ``SentenceTransformer`` applies it.
    Returns a module mapping ``(B, in_features)`` to ``(B, out_features)``; errors name ``field``.
    """
    Dense = dense_class()
    where, subfolder = dense_location(model, dense)
    local = Path(where).expanduser()
    if local.is_dir() and not (local / subfolder / "config.json").is_file():
        raise UserError(f"{field}: {local / subfolder}: no Dense module here (config.json missing)")
    if looks_local(where) and not local.is_dir():
        raise UserError(f"{field}: {where}: no such folder")
    try:
        module = Dense.load(
            where, subfolder=subfolder, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = first_line(exc)
        hint = offline_hint()
        raise UserError(
            f"{field}: cannot load the Dense module {dense!r} of {model!r}: {first[:300]}{hint}"
        ) from None
    return _DenseHead(module).eval()


class _DenseHead(torch.nn.Module):
    """A sentence-transformers Dense module as a plain ``(B, in) -> (B, out)`` float32 map."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module.float()
        self.in_features = int(module.linear.in_features)
        self.out_features = int(module.linear.out_features)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.module({"sentence_embedding": pooled.float()})["sentence_embedding"]
