"""The student's outputs as DeepSpeed ZeRO-3's module hooks see them.

ZeRO-3 registers hooks on every submodule (deepspeed 0.19.8, ``runtime/zero/parameter_offload.py``,
``_register_deepspeed_module``): after each forward, ``_post_forward_module_hook`` lists the output's
tensors to find parameters returned from a module (a dict output is read as ``name.startswith('__')``
over its keys, anything else that is not a list, tuple or tensor through ``vars()``), and the
pre-backward hook rebuilds the output around every tensor with ``apply_to_tensors_only``
(``runtime/zero/utils.py``). DeepSpeed is not installed for the test suite (an optional extra), so these
tests rebuild both walks from that source and run them as real forward hooks on every module of real
students; the first GPU run of the trainer under ZeRO-3 crashed in the first walk (``'int' object has
no attribute 'startswith'``) while the student returned a dict keyed by int dims. Where DeepSpeed is
installed, the last test also trains the student under the real ZeRO-3 engine on CPU.
"""

from __future__ import annotations

import pytest
import torch

from stella_distill.config import MRLConfig, StudentConfig
from stella_distill.student import StudentModel

TEXTS = ["the cat sat on the house", "war and peace", "a horse came back from the old city", "fish"]


def zero3_output_tensors(output) -> list:
    """``_post_forward_module_hook``'s listing of a module's output (deepspeed 0.19.8)."""
    if output is None:
        return []
    if isinstance(output, (list, tuple)):
        return list(output)
    if torch.is_tensor(output):
        return [output]
    items = output if isinstance(output, dict) else vars(output)
    return [val for name, val in items.items() if not name.startswith("__") and torch.is_tensor(val)]


def zero3_apply_to_tensors(function, value):
    """``apply_to_tensors_only`` (deepspeed 0.19.8): ``function`` on every tensor, containers rebuilt."""
    if isinstance(value, (tuple, list)):
        touched = [zero3_apply_to_tensors(function, v) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return value.__class__(*touched)
        return value.__class__(touched)
    if isinstance(value, dict):
        for key in value.keys():
            value[key] = zero3_apply_to_tensors(function, value[key])
        return value
    if isinstance(value, torch.Tensor):
        return function(value)
    return value


class _PreBackward(torch.autograd.Function):
    """Stands in for ZeRO-3's ``PreBackwardFunctionForModule``: identity forward, counts backward calls."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _PreBackward.calls += 1
        return grad


def hook_like_zero3(model: torch.nn.Module) -> list:
    """A post-forward and a pre-backward forward hook on every module, as ZeRO-3 registers them."""
    seen = []

    def post_forward(module, inputs, output):
        tensors = zero3_output_tensors(output)
        seen.append((type(module).__name__, len(tensors)))
        # ZeRO-3 then looks for parameters among them (``is_zero_param``: a ``ds_id`` attribute)
        assert not any(hasattr(t, "ds_id") for t in tensors if torch.is_tensor(t))

    def pre_backward(module, inputs, output):
        return zero3_apply_to_tensors(_PreBackward.apply, output)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_hook(post_forward))
        handles.append(module.register_forward_hook(pre_backward))
    return seen, handles


@pytest.mark.parametrize(
    "which,pooling,mode", [("bert", "mean", "heads"), ("qwen2", "last_token", "truncate")]
)
def test_student_outputs_survive_zero3_module_hooks(which, pooling, mode, tiny_bert, tiny_qwen2):
    path = {"bert": tiny_bert, "qwen2": tiny_qwen2}[which]
    cfg = StudentConfig(model=str(path), pooling=pooling, mrl=MRLConfig(mode=mode, dims=[16, 8]))
    torch.manual_seed(0)
    model = StudentModel.from_config(cfg, target_dim=24, max_length=32).eval()  # no dropout: runs compare
    model.set_trainable("all")
    batch = model.tokenize(TEXTS)

    seen, handles = hook_like_zero3(model)
    _PreBackward.calls = 0
    try:
        hooked = model(**batch)
    finally:
        for h in handles:
            h.remove()
    # the student itself is the last module to finish its forward: all three dims are found as tensors
    assert seen[-1] == ("StudentModel", 3)
    assert type(hooked) is tuple and len(hooked) == 3
    sum((v**2).mean() for v in hooked).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    plain = model(**batch)
    for a, b in zip(plain, hooked):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    sum((v**2).mean() for v in plain).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert _PreBackward.calls >= 3  # the rebuilt outputs carry the hooks into backward
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


def test_a_dict_keyed_by_int_dims_is_what_broke_zero3():
    """The walk above is DeepSpeed's: it fails the way the GPU run did on the old output type."""
    with pytest.raises(AttributeError, match="'int' object has no attribute 'startswith'"):
        zero3_output_tensors({1152: torch.zeros(2, 1152), 256: torch.zeros(2, 256)})
    assert len(zero3_output_tensors((torch.zeros(2, 4), torch.zeros(2, 2)))) == 2


_ENGINE_RUN = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import torch, deepspeed
from stella_distill.config import MRLConfig, StudentConfig
from stella_distill.student import StudentModel

torch.manual_seed(0)
cfg = StudentConfig(model=sys.argv[1], pooling="mean", mrl=MRLConfig(mode="heads", dims=[16, 8]))
student = StudentModel.from_config(cfg, target_dim=24, max_length=32)
student.set_trainable("all")
deepspeed.init_distributed(dist_backend="gloo")
config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=config)
batch = student.tokenize(["the cat sat on the house", "war and peace", "a horse came back", "fish"])
losses = []
for _ in range(3):
    out = engine(**batch)
    loss = sum((v.float() ** 2).mean() for v in student.by_dim(out).values())
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))
print("losses", losses)
"""


def test_the_student_trains_under_a_real_deepspeed_zero3_engine_on_cpu(tiny_qwen2, tmp_path):
    """Where DeepSpeed is installed (``pip install -e .[deepspeed]``): ZeRO-3 with its CPU accelerator
    and gloo, one process, three steps of the real engine over the real student."""
    pytest.importorskip("deepspeed")
    import os
    import random
    import subprocess
    import sys

    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_RUN)
    port = str(random.Random(os.getpid()).randrange(20000, 40000))
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_qwen2), port], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in proc.stdout.split("losses", 1)[1].strip(" []\n").split(",")]
    assert len(losses) == 3 and losses[2] < losses[0]
