"""The student: a Hugging Face backbone, pooling, a projection to the target dim and the MRL part.

Shape of the released Stella models: backbone -> mean pooling -> ``Linear(hidden, target_dim)``, plus
one independent ``Linear(hidden, d)`` per reduced Matryoshka dim (``2_Dense_{d}``). The student returns
un-normalised vectors; the losses (and ``encode``) normalise them.

Initialisation: the projection and the MRL heads are plain ``nn.Linear`` layers with PyTorch's default
init (Kaiming-uniform weights, uniform bias), drawn from the global torch RNG when the student is built,
so a caller that seeds torch (``torch.manual_seed`` / ``accelerate.utils.set_seed``) before
``StudentModel.from_config`` gets the same initial heads every run. ``from_pretrained`` leaves the
caller's RNG state untouched.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stella_distill.checks import mrl_dims_problem
from stella_distill.errors import UserError
from stella_distill.pooling import POOLINGS, load_backbone, load_tokenizer, pool, with_prompt

MRL_MODES = ("heads", "truncate", "none")
TRAINABLE = ("head", "last_layers", "all")
STUDENT_JSON = "student.json"
HEADS_FILE = "heads.safetensors"
BACKBONE_DIR = "backbone"


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point tensors of ``module``'s state that hold NaN or inf."""
    return [
        name
        for name, t in module.state_dict().items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]


def find_layer_list(backbone: nn.Module, field: str = "student.model") -> tuple[str, nn.ModuleList]:
    """Return ``(dotted name, ModuleList)`` of the backbone's transformer layers.

    Found generically: the ``nn.ModuleList`` whose length is ``config.num_hidden_layers`` and whose
    items share one class (``encoder.layer`` for BERT/MPNet/XLM-R, ``layers`` for Qwen2/Llama,
    ``h`` for GPT-2 ...). If several match, the shallowest wins (nested lists belong to a layer).
    """
    n = getattr(backbone.config, "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList)
        and n
        and len(module) == n
        and len({type(m) for m in module}) == 1
    ]
    if not found:
        raise UserError(
            f"{field}: cannot find the transformer layers of {type(backbone).__name__} "
            f"(no list of config.num_hidden_layers = {n} identical modules)"
        )
    return min(found, key=lambda item: item[0].count("."))


def final_norms(backbone: nn.Module) -> list[nn.Module]:
    """Normalisation modules that run after the layer list (``norm`` of Qwen2/Llama, ``ln_f`` of GPT-2).

    They are the direct siblings of the layer list registered after it whose class name contains
    "Norm"; BERT-like encoders have none (their LayerNorms live inside each layer and the embeddings).
    """
    name, layers = find_layer_list(backbone)
    parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
    norms, after = [], False
    for child in parent.children():
        if child is layers:
            after = True
        elif after and "norm" in type(child).__name__.lower():
            norms.append(child)
    return norms


def keep_layers(backbone: nn.Module, layers: list[int]) -> nn.Module:
    """Prune ``backbone`` in place to exactly ``layers`` (original indices), in that order.

    The usual way to cut a small student from a big model. Besides swapping the layer list it keeps
    the model self-consistent so that forward, KV caches and ``save_pretrained``/``from_pretrained``
    agree: ``config.num_hidden_layers`` becomes ``len(layers)``, ``config.layer_types`` (sliding vs full
    attention per layer, Qwen2 and newer) is cut the same way, and every ``layer_idx`` inside a kept
    layer is renumbered to its new position. Returns the backbone.
    """
    name, old = find_layer_list(backbone, "student.keep_layers")
    n = len(old)
    if not layers:
        raise UserError("student.keep_layers: must list at least one layer")
    for i in layers:
        if not 0 <= i < n:
            raise UserError(f"student.keep_layers: layer {i} out of range (the model has {n} layers)")
    if len(set(layers)) != len(layers):
        raise UserError(f"student.keep_layers: a layer is listed twice in {list(layers)}")

    kept = nn.ModuleList([old[i] for i in layers])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    parent_name, _, attr = name.rpartition(".")
    setattr(backbone.get_submodule(parent_name) if parent_name else backbone, attr, kept)

    config = backbone.config
    config.num_hidden_layers = len(layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == n:
        config.layer_types = [layer_types[i] for i in layers]
        for module in backbone.modules():
            # Qwen2-style models cache at init whether any layer slides; keep that flag true to the kept ones.
            if isinstance(getattr(module, "has_sliding_layers", None), bool):
                module.has_sliding_layers = "sliding_attention" in config.layer_types
    return backbone


def enable_gradient_checkpointing(backbone: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, so frozen embeddings need no input grads)."""
    if not getattr(backbone, "supports_gradient_checkpointing", False):
        raise UserError(
            f"student.gradient_checkpointing: {type(backbone).__name__} does not support gradient checkpointing"
        )
    kwargs = {"use_reentrant": False}
    # transformers >= 5.2x renamed the switch and deprecated the old name; older versions only have the old one.
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _hidden_size(backbone: nn.Module) -> int:
    config = backbone.config
    hidden = getattr(config, "hidden_size", None)
    if hidden is None and hasattr(config, "get_text_config"):
        hidden = getattr(config.get_text_config(), "hidden_size", None)
    if hidden is None:
        raise UserError(f"student.model: cannot tell the hidden size of {type(backbone).__name__}")
    return int(hidden)


def _check_mrl(mode: str, dims: list[int], target_dim: int) -> None:
    if mode not in MRL_MODES:
        raise UserError(f"student.mrl.mode: unknown mode {mode!r}; expected one of {', '.join(MRL_MODES)}")
    if mode == "none" and dims:
        raise UserError("student.mrl.mode: is 'none' but student.mrl.dims lists dims")
    if len(set(dims)) != len(dims):
        raise UserError(f"student.mrl.dims: duplicated dim in {list(dims)}")
    for d in dims:
        if d <= 0:
            raise UserError(f"student.mrl.dims: dim {d} must be positive")
    problem = mrl_dims_problem(list(dims), target_dim)
    if problem:
        raise UserError(f"student.mrl.dims: {problem}")


class StudentModel(nn.Module):
    """Backbone + pooling + ``projection: Linear(hidden, target_dim)`` + Matryoshka part.

    ``mrl_mode``:
    - ``heads``: one independent ``Linear(hidden, d)`` per reduced dim, from the pooled vector
      (``mrl_heads[str(d)]``; the released Stella layout, one ``2_Dense_{d}`` each);
    - ``truncate``: the reduced vector is the prefix ``[:d]`` of the projection output;
    - ``none``: no reduced dims.

    ``forward`` returns a plain tuple of un-normalised ``(B, dim)`` tensors, one per dim of
    ``output_dims(mrl)`` in that order (``by_dim`` turns it into ``{dim: tensor}``). A tuple, not a
    dict keyed by int dims: DeepSpeed ZeRO-3's post-forward hook reads a dict output's keys as strings
    (``name.startswith('__')``) and crashed on int keys, while tuples of tensors are walked by every
    wrapper (ZeRO-3, DDP, FSDP, accelerate's precision casts). The projection and heads are created in
    float32 on the backbone's device with PyTorch's default ``nn.Linear`` init from the global RNG.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        *,
        pooling: str,
        target_dim: int,
        mrl_mode: str = "none",
        mrl_dims: list[int] | tuple[int, ...] = (),
        max_length: int = 512,
        prompt: str = "",
        keep_layers: list[int] | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(
                f"student.pooling: unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}"
            )
        if target_dim <= 0:
            raise UserError(f"student.target_dim: must be positive; got {target_dim}")
        _check_mrl(mrl_mode, list(mrl_dims), target_dim)
        self.backbone = backbone
        self.tokenizer = tokenizer  # a plain attribute: not an nn.Module, no weights, not in state_dict
        self.pooling = pooling
        self.target_dim = int(target_dim)
        self.mrl_mode = mrl_mode
        self.mrl_dims = sorted((int(d) for d in mrl_dims), reverse=True)
        self.max_length = int(max_length)
        self.prompt = prompt
        self.kept_layers = list(keep_layers) if keep_layers is not None else None
        # Whether the backbone runs its own code: set from the config that trusted it, saved with the student
        self.trusts_remote_code = False
        self.hidden_size = _hidden_size(backbone)

        device = next(backbone.parameters()).device
        self.projection = nn.Linear(self.hidden_size, self.target_dim, device=device)
        self.mrl_heads = nn.ModuleDict()
        if mrl_mode == "heads":
            for d in self.mrl_dims:
                self.mrl_heads[str(d)] = nn.Linear(self.hidden_size, d, device=device)
        # Decoders (Qwen2) build a KV cache by default; an embedder never reuses it.
        self._no_cache = "use_cache" in inspect.signature(backbone.forward).parameters

    @classmethod
    def from_config(cls, cfg, target_dim: int, max_length: int) -> StudentModel:
        """Build the student of ``cfg`` (a ``StudentConfig``) for a target of ``target_dim`` dims.

        ``cfg.target_dim`` overrides ``target_dim`` when set. Loads backbone and tokenizer (errors name
        ``student.model``), prunes to ``cfg.keep_layers``, applies ``cfg.attn_implementation`` and
        ``cfg.gradient_checkpointing``. Seed torch before calling for reproducible heads.
        """
        target = int(cfg.target_dim or target_dim)
        mode = cfg.mrl.mode
        dims = list(cfg.mrl.dims)
        _check_mrl(mode, dims, target)
        common = {
            "revision": cfg.revision,
            "trust_remote_code": cfg.trust_remote_code,
            "field": "student.model",
        }
        tokenizer = load_tokenizer(cfg.model, **common)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError(
                    f"student.model: the tokenizer of {cfg.model!r} has neither a pad nor an eos token"
                )
            # Decoder tokenizers often ship without a pad token; pooling reads the mask, so eos is safe here.
            tokenizer.pad_token = tokenizer.eos_token
        backbone = load_backbone(cfg.model, attn_implementation=cfg.attn_implementation, **common)
        if cfg.keep_layers is not None:
            keep_layers(backbone, list(cfg.keep_layers))
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(backbone)
        student = cls(
            backbone,
            tokenizer,
            pooling=cfg.pooling,
            target_dim=target,
            mrl_mode=mode,
            mrl_dims=dims,
            max_length=max_length,
            prompt=cfg.prompt,
            keep_layers=cfg.keep_layers,
        )
        student.trusts_remote_code = bool(cfg.trust_remote_code)
        return student

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Prefix ``self.prompt``, truncate to ``self.max_length`` tokens, pad to the longest; CPU tensors.

        A batch in which no text is padded comes without ``attention_mask``: with a mask, transformers
        keeps SDPA off its flash kernel (and copies key/value heads for grouped-query attention), and
        an all-ones mask changes nothing else.
        """
        batch = dict(
            self.tokenizer(
                with_prompt(list(texts), self.prompt, self.max_length),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        if bool(batch["attention_mask"].all()):  # CPU tensors: no device sync
            del batch["attention_mask"]
        return batch

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **extra
    ) -> torch.Tensor:
        """Backbone + pooling: the pooled vector ``(B, hidden)`` in float32 (float64 for a float64 model).

        ``attention_mask`` None means no text is padded."""
        if self._no_cache:
            extra.setdefault("use_cache", False)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = pool(out.last_hidden_state, mask, self.pooling)
        return pooled if pooled.dtype == torch.float64 else pooled.float()

    def heads(self, pooled: torch.Tensor, mrl: bool = True) -> dict[int, torch.Tensor]:
        """Project the pooled vector: ``{target_dim: projection(pooled), d: reduced vector per MRL dim}``.

        The reduced vector is ``mrl_heads[d](pooled)`` in ``heads`` mode and the prefix
        ``projection(pooled)[:, :d]`` in ``truncate`` mode. Un-normalised. ``mrl=False`` returns only
        the full dim. ``pooled`` is cast to the projection's dtype (bf16 weights under DeepSpeed get no
        autocast, and a float32 input would fail the matmul).
        """
        pooled = pooled.to(self.projection.weight.dtype)
        full = self.projection(pooled)
        out = {self.target_dim: full}
        if mrl:
            for d in self.mrl_dims:
                out[d] = self.mrl_heads[str(d)](pooled) if self.mrl_mode == "heads" else full[:, :d]
        return out

    def output_dims(self, mrl: bool = True) -> list[int]:
        """The dims ``forward`` returns, in its order: the target dim, then the MRL dims, largest first."""
        return [self.target_dim, *self.mrl_dims] if mrl else [self.target_dim]

    def by_dim(self, outputs: tuple[torch.Tensor, ...], mrl: bool = True) -> dict[int, torch.Tensor]:
        """``{dim: tensor}`` of a ``forward`` output (called with the same ``mrl``)."""
        dims = self.output_dims(mrl)
        if len(outputs) != len(dims):
            raise ValueError(f"by_dim: {len(outputs)} outputs for dims {dims} (mrl={mrl})")
        return dict(zip(dims, outputs))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, mrl: bool = True, **extra
    ) -> tuple[torch.Tensor, ...]:
        """``heads(embed(input_ids, attention_mask, **extra), mrl)`` as a tuple in ``output_dims(mrl)`` order.

        With a frozen backbone (stage 1) the backbone runs without autograd: no activations are kept
        for it, which makes head-only training several times cheaper.
        """
        if torch.is_grad_enabled() and self.backbone_frozen():
            with torch.no_grad():
                pooled = self.embed(input_ids, attention_mask, **extra)
        else:
            pooled = self.embed(input_ids, attention_mask, **extra)
        return tuple(self.heads(pooled, mrl=mrl).values())

    def set_trainable(self, trainable: str, last_layers: int = 3) -> list[str]:
        """Set ``requires_grad`` for a training stage and return the names of the trainable parameters.

        - ``head``: the projection and the MRL heads only (the backbone is frozen);
        - ``last_layers``: the head plus the last ``last_layers`` transformer layers of the (possibly
          pruned) backbone, and the final norm that follows the layers in decoders (Qwen2's ``norm``);
        - ``all``: everything, except a BERT-style ``pooler`` of the backbone: the student pools the
          token states itself, so the pooler never gets a gradient (and DDP would fail on it).
        """
        if trainable not in TRAINABLE:
            raise UserError(f"trainable: unknown value {trainable!r}; expected one of {', '.join(TRAINABLE)}")
        self.requires_grad_(False)
        self.projection.requires_grad_(True)
        self.mrl_heads.requires_grad_(True)
        if trainable == "last_layers":
            _, layers = find_layer_list(self.backbone)
            if not 1 <= last_layers <= len(layers):
                raise UserError(
                    f"last_layers: {last_layers} must be between 1 and the student's {len(layers)} layers"
                )
            for layer in layers[len(layers) - last_layers :]:
                layer.requires_grad_(True)
            for norm in final_norms(self.backbone):
                norm.requires_grad_(True)
        elif trainable == "all":
            self.backbone.requires_grad_(True)
            pooler = getattr(self.backbone, "pooler", None)
            if isinstance(pooler, nn.Module):
                pooler.requires_grad_(False)
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def backbone_frozen(self) -> bool:
        """True iff no backbone parameter requires grad (the trainer may then run it under no_grad)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``path/backbone/`` (model in safetensors + tokenizer), ``path/heads.safetensors`` and
        ``path/student.json``; ``from_pretrained(path)`` restores identical weights.

        ``state_dict`` (this module's keys) overrides the live weights: under ZeRO-3 / FSDP the live
        parameters are shards, and the trainer passes the full state gathered by accelerate.
        """
        from safetensors.torch import save_file

        path = Path(path)
        state = state_dict if state_dict is not None else self.state_dict()
        (path / BACKBONE_DIR).mkdir(parents=True, exist_ok=True)
        backbone_state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path / BACKBONE_DIR, state_dict=backbone_state)
        self.tokenizer.save_pretrained(path / BACKBONE_DIR)
        tensors = {k: v for k, v in state.items() if k.startswith(("projection.", "mrl_heads."))}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / HEADS_FILE))
        meta = {
            "pooling": self.pooling,
            "target_dim": self.target_dim,
            "mrl_mode": self.mrl_mode,
            "mrl_dims": self.mrl_dims,
            "max_length": self.max_length,
            "prompt": self.prompt,
            "hidden_size": self.hidden_size,
            "keep_layers": self.kept_layers,
            "trust_remote_code": self.trusts_remote_code,
        }
        (path / STUDENT_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        trust_remote_code: bool | None = None,
        attn_implementation: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> StudentModel:
        """Load a folder written by ``save_pretrained`` (the pruned layer count comes with the config).

        ``trust_remote_code`` None: as the student was saved (what its run's config said)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, heads_file = path / STUDENT_JSON, path / HEADS_FILE
        for f in (meta_file, heads_file, path / BACKBONE_DIR):
            if not f.exists():
                raise UserError(f"{path}: not a saved student (missing {f.name})")
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as exc:
            raise UserError(f"{meta_file}: not valid JSON ({exc})") from None
        field = str(path / BACKBONE_DIR)
        if trust_remote_code is None:
            trust_remote_code = meta.get("trust_remote_code") is True
        common = {"revision": None, "trust_remote_code": trust_remote_code, "field": field}
        tokenizer = load_tokenizer(str(path / BACKBONE_DIR), **common)
        backbone = load_backbone(
            str(path / BACKBONE_DIR), dtype=dtype, attn_implementation=attn_implementation, **common
        )
        if _hidden_size(backbone) != meta["hidden_size"]:
            raise UserError(
                f"{meta_file}: hidden_size {meta['hidden_size']} does not match the backbone's {_hidden_size(backbone)}"
            )
        # Building the heads draws from the RNG; the weights are overwritten, so spare the caller's stream.
        with torch.random.fork_rng(devices=[]):
            model = cls(
                backbone,
                tokenizer,
                pooling=meta["pooling"],
                target_dim=meta["target_dim"],
                mrl_mode=meta["mrl_mode"],
                mrl_dims=meta["mrl_dims"],
                max_length=meta["max_length"],
                prompt=meta["prompt"],
                keep_layers=meta.get("keep_layers"),
            )
        model.trusts_remote_code = bool(trust_remote_code)
        state = load_file(str(heads_file))
        expected = {f"projection.{k}" for k in model.projection.state_dict()}
        expected |= {f"mrl_heads.{k}" for k in model.mrl_heads.state_dict()}
        if set(state) != expected:
            raise UserError(
                f"{heads_file}: tensors {sorted(state)} do not match {meta_file} (expected {sorted(expected)})"
            )
        nn.ModuleDict({"projection": model.projection, "mrl_heads": model.mrl_heads}).load_state_dict(state)
        return model

    @torch.no_grad()
    def encode(
        self, texts: list[str], batch_size: int = 32, dim: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Embed ``texts`` in eval mode: a float32 CPU tensor ``(len(texts), dim)`` in input order.

        ``dim`` is the target dim (default) or one of ``mrl_dims``. Texts are batched longest first to
        cut padding; the training/eval mode is restored afterwards.
        """
        dim = self.target_dim if dim is None else int(dim)
        if dim != self.target_dim and dim not in self.mrl_dims:
            offered = [self.target_dim, *self.mrl_dims]
            raise UserError(f"dim: the student offers dims {offered}, not {dim}")
        texts = list(texts)
        result = torch.empty(len(texts), dim)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = self.projection.weight.device
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx]).items()}
                mrl = dim != self.target_dim
                out = self.by_dim(self(**batch, mrl=mrl), mrl)[dim].float()
                if normalize:
                    out = F.normalize(out, dim=-1)
                result[idx] = out.cpu()
        finally:
            self.train(was_training)
        return result
