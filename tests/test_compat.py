"""Whether a checkpoint was trained by the config at hand: digests first, then field by field, so a
changed field is named and a field that one stella-distill version has and another lacks (at its
default) changes nothing."""

import copy
import json

import pytest
import yaml

from stella_distill import run
from stella_distill.compat import compat, differences, mismatch
from stella_distill.config import from_dict
from stella_distill.errors import UserError

BASE = {
    "name": "x",
    "output_dir": "/tmp/unused-run",
    "cache_dir": "/tmp/unused-cache",
    "seed": 7,
    "data": {"train": [{"path": "a.txt"}]},
    "teachers": [{"name": "t1", "model": "m1"}, {"name": "t2", "model": "m2"}],
    "student": {"model": "s", "mrl": {"mode": "heads", "dims": [8]}},
    "stages": [
        {"name": "a", "trainable": "head", "steps": 3, "batch_size": 4, "lr": 1e-3},
        {"name": "b", "trainable": "all", "steps": 3, "batch_size": 4, "lr": 1e-4},
    ],
}


def config(change=None):
    data = copy.deepcopy(BASE)
    if change:
        change(data)
    return from_dict(data, resolve_models=False)


def checkpoint(tmp_path, cfg, stage_index=1, edit_yaml=None):
    """A checkpoint folder as the trainer leaves it (``run.finish_checkpoint``: config.yaml, then the
    state with the compat digests and the config's checksum); with ``edit_yaml``, as an older version
    left it: another config.yaml, digests over other fields, no checksum."""
    folder = tmp_path / "checkpoints" / "step-00000004"
    tmp = run.temp_dir(folder)
    tmp.mkdir(parents=True)
    run.finish_checkpoint(tmp, folder, cfg, run.Position(stage_index, 1, 4, False), world_size=1)
    if edit_yaml:
        data = yaml.safe_load((folder / run.CONFIG_FILE).read_text())
        edit_yaml(data)
        (folder / run.CONFIG_FILE).write_text(yaml.safe_dump(data))
        state = json.loads((folder / run.STATE_FILE).read_text())
        del state["config_sha256"]
        state["compat"] = {"model": "older", "data": "older", "stages": ["older"] * len(cfg.stages)}
        (folder / run.STATE_FILE).write_text(json.dumps(state))
    return folder


def test_same_config_resumes(tmp_path):
    cfg = config()
    assert run.check_resumable(checkpoint(tmp_path, cfg), cfg)["global_step"] == 4


@pytest.mark.parametrize(
    "change, needles",
    [
        (
            lambda d: d.update(seed=8),
            ["another student/teachers/seed config", "(seed: 7 in the checkpoint, 8 now)"],
        ),
        (
            lambda d: d["student"].update(pooling="cls"),
            ["student.pooling: 'mean' in the checkpoint, 'cls' now"],
        ),
        (
            lambda d: d["teachers"][1].update(prompt="query: "),
            ["teachers.1.prompt: ", " in the checkpoint, 'query: ' now"],
        ),
        (lambda d: d["teachers"].pop(), ["teachers.1: present in the checkpoint, absent now"]),
        (
            lambda d: d["data"].update(max_length=32),
            ["another data config", "data.max_length: 512 in the checkpoint, 32 now"],
        ),
        (
            lambda d: d["stages"][1].update(lr=5e-4),
            ["stages.1: differs", "stages.1.lr: 0.0001 in the checkpoint, 0.0005 now"],
        ),
        (
            lambda d: d["stages"].pop(),
            ["stages.1: differs", "stages.1: present in the checkpoint, absent now"],
        ),
    ],
    ids=["seed", "student", "teacher", "teacher-removed", "data", "stage", "stage-removed"],
)
def test_a_changed_field_is_named(tmp_path, change, needles):
    folder = checkpoint(tmp_path, config())
    with pytest.raises(UserError) as err:
        run.check_resumable(folder, config(change))
    for needle in needles:
        assert needle in str(err.value)


def test_run_only_knobs_and_unstarted_stages_do_not_count(tmp_path):
    folder = checkpoint(tmp_path, config(), stage_index=0)

    def change(d):
        d["teachers"][0].update(batch_tokens=512, shard_size=16)
        d["data"]["train"][0]["streaming"] = False
        d["stages"][1]["lr"] = 0.5  # stage 1 has not started at this checkpoint

    state = json.loads((folder / run.STATE_FILE).read_text())
    assert mismatch(state, state["stage_index"] + 1, folder / run.CONFIG_FILE, config(change)) is None


def test_a_field_another_version_lacks_counts_only_away_from_its_default(tmp_path):
    """A checkpoint written before `student.attn_implementation` existed (and with a field this version
    no longer has) resumes; it is refused once the config sets the new field away from its default."""

    def older(d):
        del d["student"]["attn_implementation"], d["stages"][0]["warmup_ratio"]
        d["data"]["retired_field"] = None

    folder = checkpoint(tmp_path, config(), edit_yaml=older)
    state = json.loads((folder / run.STATE_FILE).read_text())
    assert state["compat"] != compat(config())  # the digests alone would refuse it
    assert run.check_resumable(folder, config())["global_step"] == 4
    with pytest.raises(
        UserError, match=r"student\.attn_implementation: absent in the checkpoint, 'eager' now"
    ):
        run.check_resumable(folder, config(lambda d: d["student"].update(attn_implementation="eager")))
    with pytest.raises(UserError, match=r"stages\.0\.warmup_ratio: absent in the checkpoint, 0\.3 now"):
        run.check_resumable(folder, config(lambda d: d["stages"][0].update(warmup_ratio=0.3)))


def test_without_a_config_to_compare_the_digests_decide(tmp_path):
    folder = checkpoint(tmp_path, config())
    (folder / run.CONFIG_FILE).unlink()
    assert run.check_resumable(folder, config())["global_step"] == 4
    with pytest.raises(UserError, match=r"another student/teachers/seed config; use a new output_dir"):
        run.check_resumable(folder, config(lambda d: d.update(seed=8)))


def test_differences_lists_every_changed_field():
    def change(d):
        d.update(seed=1)
        d["student"]["mrl"]["dims"] = [8, 4]
        d["stages"][0]["steps"] = 5

    found = differences(config().to_dict(), config(change))
    assert found == {
        "model": ["seed: 7 in the checkpoint, 1 now", "student.mrl.dims: [8] in the checkpoint, [8, 4] now"],
        "stages": ["stages.0.steps: 3 in the checkpoint, 5 now"],
    }


def test_final_counts_as_done_across_versions(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config()
    run.save_final(run_dir, cfg, 6, lambda folder: folder.mkdir(parents=True))
    assert (run_dir / run.FINAL / run.CONFIG_FILE).is_file()
    assert run.training_complete(cfg, run_dir)
    state_file = run_dir / run.FINAL / run.STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "compat": {"model": "older", "data": "older", "stages": []}}))
    assert run.training_complete(cfg, run_dir)  # the digests differ, the fields do not
    assert not run.training_complete(config(lambda d: d["stages"][1].update(steps=9)), run_dir)


def test_a_damaged_config_is_not_compared(tmp_path):
    """A config.yaml whose bytes no longer match the checksum in the checkpoint's state (cut short,
    edited) is not compared field by field: the digests decide, so a field cut away cannot pass for
    one at its default."""
    folder = checkpoint(tmp_path, config())  # seed 7
    text = (folder / run.CONFIG_FILE).read_text()
    (folder / run.CONFIG_FILE).write_text(
        "".join(line for line in text.splitlines(True) if not line.startswith("seed:"))
    )
    with pytest.raises(UserError, match=r"another student/teachers/seed config; use a new output_dir"):
        run.check_resumable(folder, config(lambda d: d.pop("seed")))  # seed at its default, 42


def test_a_config_without_its_stages_names_the_first_stage(tmp_path):
    folder = checkpoint(tmp_path, config(), edit_yaml=lambda d: d.pop("stages"))
    with pytest.raises(
        UserError, match=r"^stages\.0: differs from the checkpoint .*stages: \[\] in the checkpoint"
    ):
        run.check_resumable(folder, config())
