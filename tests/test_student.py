"""StudentModel: layer pruning, pooling, projection + MRL heads, freezing, save/load, tokenisation."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from stella_distill.config import MRLConfig, StudentConfig
from stella_distill.errors import UserError
from stella_distill.student import StudentModel, find_layer_list, keep_layers

TEXTS = ["the cat sat on the house", "war and peace", "a horse came back from the old city", "fish"]


def student(path, *, target_dim=24, max_length=64, mode="heads", dims=(16, 8), seed=0, **fields):
    """A StudentModel built the way the trainer builds it: StudentConfig -> from_config, seeded, eval."""
    cfg = StudentConfig(model=str(path), mrl=MRLConfig(mode=mode, dims=list(dims)), **fields)
    torch.manual_seed(seed)
    return StudentModel.from_config(cfg, target_dim=target_dim, max_length=max_length).eval()


def batch_of(model, texts):
    return model.tokenize(texts)


# ---------------------------------------------------------------- keep_layers


def manual_bert(model, ids, layers):
    """Embeddings, then the chosen original layers in order, no padding (so no mask needed)."""
    h = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    for i in layers:
        out = model.encoder.layer[i](h, None)
        h = out[0] if isinstance(out, tuple) else out
    return h


def causal_mask(length, dtype, window=None):
    """Additive (1, 1, L, L) mask: causal, and with ``window`` only the last ``window`` keys."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    mask = torch.zeros(length, length, dtype=dtype)
    mask[~allowed] = torch.finfo(dtype).min
    return mask[None, None]


def manual_qwen2(model, ids, layers, layer_types, window=None):
    """Token embeddings, rotary, the chosen original decoder layers (each with its own mask), final norm."""
    h = model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = model.rotary_emb(h, pos)
    for i in layers:
        kind = layer_types[i]
        mask = causal_mask(ids.shape[1], h.dtype, window if kind == "sliding_attention" else None)
        out = model.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        h = out[0] if isinstance(out, tuple) else out
    return model.norm(h)


def layer_indices(layer_list):
    return [
        [m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        for layer in layer_list
    ]


def test_keep_layers_bert_matches_original_layers(tiny_bert4):
    original = AutoModel.from_pretrained(tiny_bert4).eval()
    pruned = keep_layers(AutoModel.from_pretrained(tiny_bert4).eval(), [0, 3])
    assert len(pruned.encoder.layer) == 2 and pruned.config.num_hidden_layers == 2
    assert all(idx and set(idx) == {k} for k, idx in enumerate(layer_indices(pruned.encoder.layer)))
    ids = torch.randint(5, 100, (3, 9))
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        want = manual_bert(original, ids, [0, 3])
        other = manual_bert(original, ids, [0, 1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - other).abs().max() > 1e-3  # the reference really depends on which layers are kept


def test_keep_layers_bert_any_order(tiny_bert4):
    original = AutoModel.from_pretrained(tiny_bert4).eval()
    pruned = keep_layers(AutoModel.from_pretrained(tiny_bert4).eval(), [2, 1, 3])
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        want = manual_bert(original, ids, [2, 1, 3])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_keep_layers_qwen2_fixture_matches_original_layer(tiny_qwen2):
    original = AutoModel.from_pretrained(tiny_qwen2).eval()
    pruned = keep_layers(AutoModel.from_pretrained(tiny_qwen2).eval(), [1])
    assert len(pruned.layers) == 1 and pruned.config.num_hidden_layers == 1
    assert pruned.config.layer_types == [original.config.layer_types[1]]
    assert layer_indices(pruned.layers) == [[0]]
    ids = torch.randint(1, 300, (2, 8))
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
        cached = pruned(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        want = manual_qwen2(original, ids, [1], original.config.layer_types)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.last_hidden_state, want, atol=1e-5, rtol=0)
    assert len(cached.cache.layers) == 1


def test_keep_layers_qwen2_sliding_layer_types():
    """Mixed full/sliding layers: the kept layers must keep their own attention type and mask."""
    from transformers import Qwen2Config, Qwen2Model

    window = 3
    types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=window,
        layer_types=types,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    original = Qwen2Model(config).eval()
    pruned = keep_layers(Qwen2Model(config).eval(), [0, 3])
    pruned.load_state_dict(
        {k: v for k, v in original.state_dict().items() if not k.startswith("layers.")}, strict=False
    )
    for new, old in enumerate([0, 3]):
        pruned.layers[new].load_state_dict(original.layers[old].state_dict())
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert layer_indices(pruned.layers) == [[0], [1]]
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        got = pruned(input_ids=ids, use_cache=False).last_hidden_state
        want = manual_qwen2(original, ids, [0, 3], types, window)
        all_full = manual_qwen2(original, ids, [0, 3], ["full_attention"] * 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - all_full).abs().max() > 1e-3  # the sliding mask matters at this length


@pytest.mark.parametrize("kind", ["mpnet", "xlm-roberta"])
def test_keep_layers_other_encoders(kind):
    from transformers import MPNetConfig, MPNetModel, XLMRobertaConfig, XLMRobertaModel

    cls, config_cls = {
        "mpnet": (MPNetModel, MPNetConfig),
        "xlm-roberta": (XLMRobertaModel, XLMRobertaConfig),
    }[kind]
    config = config_cls(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    original = cls(config).eval()
    old_states = [layer.state_dict() for layer in original.encoder.layer]
    name, _ = find_layer_list(original)
    assert name == "encoder.layer"
    pruned = keep_layers(original, [0, 2])
    assert pruned.config.num_hidden_layers == 2 and len(pruned.encoder.layer) == 2
    for new, old in enumerate([0, 2]):
        for key, value in pruned.encoder.layer[new].state_dict().items():
            assert torch.equal(value, old_states[old][key])
    ids = torch.randint(3, 50, (2, 6))
    assert pruned(input_ids=ids).last_hidden_state.shape == (2, 6, 16)


def test_keep_layers_out_of_range(tiny_bert4):
    with pytest.raises(
        UserError, match=r"student\.keep_layers: layer 7 out of range \(the model has 4 layers\)"
    ):
        keep_layers(AutoModel.from_pretrained(tiny_bert4), [0, 7])
    with pytest.raises(UserError, match=r"student\.keep_layers: layer 4 out of range"):
        student(tiny_bert4, keep_layers=[4])


def test_keep_layers_survive_save_and_reload(tiny_bert4, tmp_path):
    model = student(tiny_bert4, keep_layers=[0, 3])
    model.save_pretrained(tmp_path / "s")
    again = StudentModel.from_pretrained(tmp_path / "s").eval()
    assert len(again.backbone.encoder.layer) == 2 and again.backbone.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "s" / "student.json").read_text())["keep_layers"] == [0, 3]
    batch = batch_of(model, TEXTS)
    with torch.no_grad():
        for d, v in model.by_dim(model(**batch)).items():
            assert torch.equal(v, again.by_dim(again(**batch))[d])


# ---------------------------------------------------------------- pooling and heads


def naive_pool(hidden, mask, mode):
    rows = []
    for h, m in zip(hidden, mask):
        real = [t for t in range(len(m)) if m[t] == 1]
        if mode == "cls":
            rows.append(h[0])
        elif mode == "mean":
            rows.append(sum(h[t] for t in real) / len(real))
        else:
            rows.append(h[real[-1]])
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
def test_embed_pools_backbone_states(tiny_bert, pooling):
    model = student(tiny_bert, pooling=pooling)
    batch = batch_of(model, TEXTS)
    assert (batch["attention_mask"] == 0).any()  # a padded batch
    with torch.no_grad():
        got = model.embed(**batch)
        hidden = model.backbone(**batch).last_hidden_state
    assert got.dtype == torch.float32 and got.shape == (len(TEXTS), 32)
    torch.testing.assert_close(got, naive_pool(hidden, batch["attention_mask"], pooling), atol=1e-6, rtol=0)


def test_forward_heads_mode_independent_heads(tiny_bert):
    model = student(tiny_bert, target_dim=24, mode="heads", dims=[8, 16])
    assert model.mrl_dims == [16, 8] and sorted(model.mrl_heads.keys()) == ["16", "8"]
    batch = batch_of(model, TEXTS)
    with torch.no_grad():
        out = model.by_dim(model(**batch))
        pooled = model.embed(**batch)
    assert sorted(out) == [8, 16, 24]
    torch.testing.assert_close(out[24], pooled @ model.projection.weight.T + model.projection.bias)
    for d in (16, 8):
        head = model.mrl_heads[str(d)]
        assert head.weight.shape == (d, 32) and head.bias.shape == (d,)
        torch.testing.assert_close(out[d], pooled @ head.weight.T + head.bias)
        assert not torch.allclose(out[d], out[24][:, :d])
        assert head.weight.data_ptr() != model.projection.weight.data_ptr()
    with torch.no_grad():
        assert model.output_dims(mrl=False) == [24] and len(model(**batch, mrl=False)) == 1


def test_forward_truncate_mode_prefixes(tiny_bert):
    model = student(tiny_bert, target_dim=24, mode="truncate", dims=[16, 4])
    assert len(model.mrl_heads) == 0
    names = {n for n, _ in model.named_parameters() if not n.startswith("backbone.")}
    assert names == {"projection.weight", "projection.bias"}
    with torch.no_grad():
        out = model.by_dim(model(**batch_of(model, TEXTS)))
    assert sorted(out) == [4, 16, 24]
    for d in (16, 4):
        assert torch.equal(out[d], out[24][:, :d])


def test_forward_no_mrl(tiny_bert):
    model = student(tiny_bert, target_dim=12, mode="none", dims=[])
    with torch.no_grad():
        out = model.by_dim(model(**batch_of(model, TEXTS)))
    assert list(out) == [12] and out[12].shape == (len(TEXTS), 12)


def test_heads_cast_pooled_to_projection_dtype(tiny_bert):
    model = student(tiny_bert, target_dim=12, dims=[4])
    model.projection.to(torch.bfloat16)
    model.mrl_heads.to(torch.bfloat16)
    out = model.heads(torch.randn(3, 32))
    assert {d: v.dtype for d, v in out.items()} == {12: torch.bfloat16, 4: torch.bfloat16}


def test_target_dim_from_config_wins_and_dim_errors(tiny_bert):
    assert student(tiny_bert, target_dim=24, dims=[8]).projection.out_features == 24
    cfg = StudentConfig(model=str(tiny_bert), target_dim=20, mrl=MRLConfig(mode="heads", dims=[8]))
    assert StudentModel.from_config(cfg, target_dim=24, max_length=32).projection.out_features == 20
    with pytest.raises(UserError, match=r"student\.mrl\.dims: dim 32 is larger than the target dim 24"):
        student(tiny_bert, target_dim=24, dims=[32, 8])
    with pytest.raises(UserError, match=r"student\.mrl\.dims: dim 24 equals the target dim"):
        student(tiny_bert, target_dim=24, mode="truncate", dims=[24, 8])


def test_heads_init_follows_torch_seed(tiny_bert):
    a, b, c = student(tiny_bert, seed=5), student(tiny_bert, seed=5), student(tiny_bert, seed=6)
    assert torch.equal(a.projection.weight, b.projection.weight)
    assert torch.equal(a.mrl_heads["8"].bias, b.mrl_heads["8"].bias)
    assert not torch.equal(a.projection.weight, c.projection.weight)


# ---------------------------------------------------------------- set_trainable


def expected_trainable(model, trainable, layer_prefix, n_layers, last, extra=()):
    names = [n for n, _ in model.named_parameters()]
    head = {n for n in names if n.startswith(("projection.", "mrl_heads."))}
    if trainable == "head":
        return head
    if trainable == "all":
        return {n for n in names if not n.startswith("backbone.pooler.")}
    prefixes = tuple(f"backbone.{layer_prefix}.{i}." for i in range(n_layers - last, n_layers)) + tuple(extra)
    return head | {n for n in names if n.startswith(prefixes)}


CASES = {
    "bert4": ("encoder.layer", 4, 2, ()),
    "qwen2": ("layers", 2, 1, ("backbone.norm.",)),
}


@pytest.mark.parametrize("trainable", ["head", "last_layers", "all"])
@pytest.mark.parametrize("which", ["bert4", "qwen2"])
def test_set_trainable_freezes_exactly(which, trainable, tiny_bert4, tiny_qwen2):
    path = {"bert4": tiny_bert4, "qwen2": tiny_qwen2}[which]
    layer_prefix, n_layers, last, extra = CASES[which]
    model = student(path, pooling="mean" if which == "bert4" else "last_token").train()
    names = model.set_trainable(trainable, last_layers=last)
    want = expected_trainable(model, trainable, layer_prefix, n_layers, last, extra)
    assert set(names) == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert model.backbone_frozen() == (trainable == "head")
    if which == "bert4":
        assert any(n.startswith("backbone.pooler.") for n, _ in model.named_parameters())

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-2, weight_decay=0.1
    )  # every param, like a sloppy trainer
    out = model(**batch_of(model, TEXTS))
    sum((v**2).mean() for v in out).backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (n in want), n


def test_set_trainable_last_layers_after_pruning(tiny_bert4):
    model = student(tiny_bert4, keep_layers=[0, 2, 3])
    names = set(model.set_trainable("last_layers", last_layers=1))
    layer_names = {n.split(".")[3] for n in names if n.startswith("backbone.encoder.layer.")}
    assert layer_names == {"2"}  # index in the pruned list: original layer 3
    with pytest.raises(UserError, match="last_layers"):
        model.set_trainable("last_layers", last_layers=4)


# ---------------------------------------------------------------- save/load, tokenize, encode


@pytest.mark.parametrize("which", ["bert-heads", "qwen2-truncate"])
def test_save_and_reload_identical(which, tiny_bert, tiny_qwen2, tmp_path):
    if which == "bert-heads":
        model = student(tiny_bert, target_dim=24, mode="heads", dims=[16, 8], prompt="query: ")
        keys = {"projection.weight", "projection.bias"}
        keys |= {f"mrl_heads.{d}.{w}" for d in (16, 8) for w in ("weight", "bias")}
    else:
        model = student(tiny_qwen2, pooling="last_token", target_dim=24, mode="truncate", dims=[8])
        keys = {"projection.weight", "projection.bias"}
    model.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "backbone" / "model.safetensors").is_file()
    assert (tmp_path / "s" / "backbone" / "tokenizer_config.json").is_file()
    assert set(load_file(tmp_path / "s" / "heads.safetensors")) == keys
    meta = json.loads((tmp_path / "s" / "student.json").read_text())
    assert meta == {
        "pooling": model.pooling,
        "target_dim": 24,
        "mrl_mode": model.mrl_mode,
        "mrl_dims": model.mrl_dims,
        "max_length": 64,
        "prompt": model.prompt,
        "hidden_size": 32,
        "keep_layers": None,
        "trust_remote_code": False,
    }
    rng = torch.get_rng_state()
    again = StudentModel.from_pretrained(tmp_path / "s").eval()
    assert torch.equal(rng, torch.get_rng_state())  # loading does not consume the caller's RNG
    for (n, p), (m, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    batch = again.tokenize(TEXTS)
    assert torch.equal(batch["input_ids"], model.tokenize(TEXTS)["input_ids"])
    with torch.no_grad():
        a, b = model.by_dim(model(**batch)), again.by_dim(again(**batch))
    assert sorted(a) == sorted(b) and all(torch.equal(a[d], b[d]) for d in a)


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(UserError, match="missing student.json"):
        StudentModel.from_pretrained(tmp_path)


def test_tokenize_applies_prompt_and_max_length(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = student(tiny_bert, prompt="red king ", max_length=6)
    batch = model.tokenize(TEXTS)
    assert batch["input_ids"].shape == (len(TEXTS), 6)
    want = tok(
        ["red king " + t for t in TEXTS], truncation=True, max_length=6, padding=True, return_tensors="pt"
    )
    assert torch.equal(batch["input_ids"], want["input_ids"])
    assert torch.equal(batch["attention_mask"], want["attention_mask"])
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "red king the cat"
    assert tok.decode(batch["input_ids"][3], skip_special_tokens=True) == "red king fish"
    assert batch["attention_mask"][3].tolist() == [1, 1, 1, 1, 1, 0]
    long = student(tiny_bert, max_length=64).tokenize(TEXTS)
    assert long["input_ids"].shape[1] == max(len(tok(t)["input_ids"]) for t in TEXTS)


@pytest.mark.parametrize("which", ["bert", "qwen2"])
def test_a_batch_without_padding_runs_without_a_mask_and_gives_the_same_vectors(which, tiny_bert, tiny_qwen2):
    model = student({"bert": tiny_bert, "qwen2": tiny_qwen2}[which], pooling="mean", max_length=4)
    long_texts = [TEXTS[0], TEXTS[2]]
    batch = model.tokenize(long_texts)  # both texts cut to 4 tokens: nothing padded
    assert set(batch) - {"token_type_ids"} == {"input_ids"} and batch["input_ids"].shape == (2, 4)
    with torch.no_grad():
        without = model(**batch)
        with_mask = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    for a, b in zip(without, with_mask):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert "attention_mask" in model.tokenize(["war and peace", "fish"])  # padded: the mask stays


def test_qwen2_last_token_left_padding_matches_alone(tiny_qwen2):
    model = student(tiny_qwen2, pooling="last_token", target_dim=24, dims=[8])
    assert model.tokenizer.padding_side == "left"
    batch = model.tokenize(TEXTS)
    assert (batch["attention_mask"][:, 0] == 0).any()  # some rows really are left-padded
    with torch.no_grad():
        together = model.by_dim(model(**batch))
        for i, text in enumerate(TEXTS):
            alone = model.by_dim(model(**model.tokenize([text])))
            for d in together:
                torch.testing.assert_close(together[d][i], alone[d][0], atol=1e-5, rtol=0)


def test_encode_order_dims_and_mode(tiny_bert):
    model = student(tiny_bert, target_dim=24, dims=[16, 8]).train()
    full = model.encode(TEXTS, batch_size=3)
    assert model.training  # mode restored
    assert full.shape == (len(TEXTS), 24)
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(len(TEXTS)))
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(full[i], model.encode([text])[0], atol=1e-5, rtol=0)
    raw = model.encode(TEXTS, dim=8, normalize=False)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(raw, model.by_dim(model(**model.tokenize(TEXTS)))[8], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="offers dims"):
        model.encode(TEXTS, dim=5)


# ---------------------------------------------------------------- attention kernel, checkpointing


def test_eager_and_sdpa_agree(tiny_bert):
    a = student(tiny_bert, attn_implementation="eager")
    b = student(tiny_bert, attn_implementation="sdpa")
    assert a.backbone.config._attn_implementation == "eager"
    assert b.backbone.config._attn_implementation == "sdpa"
    batch = batch_of(a, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(a(**batch)[0], b(**batch)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["bert", "qwen2"])
def test_gradient_checkpointing_same_gradients(which, tiny_bert, tiny_qwen2):
    path = {"bert": tiny_bert, "qwen2": tiny_qwen2}[which]
    grads = []
    for checkpointing in (False, True):
        model = student(path, pooling="last_token", gradient_checkpointing=checkpointing).train()
        model.set_trainable("all")
        assert model.backbone.is_gradient_checkpointing == checkpointing
        out = model(**batch_of(model, TEXTS))
        sum((v**2).mean() for v in out).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)
