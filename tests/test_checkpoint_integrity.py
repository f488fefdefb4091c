"""Checkpoint manifests: written last after fsync, verified before loading, damaged checkpoints skipped or named."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from test_train_loop import _records, make_distiller

from minidistill.errors import MinidistillError
from minidistill.training import checkpoint as ckpt

STEP = "step-{:08d}".format


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6 (the reference for every test here)."""
    run = tmp_path_factory.mktemp("ckpt") / "full"
    make_distiller(run, train={"max_steps": 6, "save_every": 2, "keep_last": 3}, eval={"max_blocks": 1}).run()
    return run


def _copy_run(full_run: Path, dest: Path) -> Path:
    shutil.copytree(full_run, dest)
    return dest


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_manifest_lists_every_file_with_size_and_hash(full_run):
    root = full_run / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [STEP(2), STEP(4), STEP(6)]
    for folder in ckpt.list_checkpoints(root):
        manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
        on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST_FILE}
        assert set(manifest["files"]) == set(on_disk)
        for rel, entry in manifest["files"].items():
            assert entry["size"] == on_disk[rel].stat().st_size
            if rel.endswith((".safetensors", ".json")):
                assert entry["sha256"] == _sha(on_disk[rel])
        assert {"model.safetensors", "trainer_state.json", "rng_state_0.json", "rng_state_0.safetensors"} <= set(on_disk)
        assert not [r for r in on_disk if r.endswith(".pkl")]  # accelerate's pickled RNG states are replaced
        assert manifest["step"] == ckpt.read_trainer_state(folder)["step"]
        assert ckpt.checkpoint_problems(folder) == []


def test_manifest_is_written_last_after_every_file_is_fsynced(tmp_path, monkeypatch):
    synced: list[Path] = []
    order: list[str] = []
    real_fsync, real_json = ckpt._fsync_path, ckpt.write_json_durably

    def fsync(path):
        synced.append(Path(path))
        real_fsync(path)

    def write_json(path, data):
        order.append(Path(path).name)
        if Path(path).name == ckpt.MANIFEST_FILE:  # everything listed must already be on disk
            listed = {Path(path).parent / rel for rel in data["files"]}
            assert listed <= set(synced), sorted(map(str, listed - set(synced)))
            assert Path(path).parent in synced
        real_json(path, data)

    monkeypatch.setattr(ckpt, "_fsync_path", fsync)
    monkeypatch.setattr(ckpt, "write_json_durably", write_json)
    run = tmp_path / "run"
    make_distiller(run, train={"max_steps": 2, "save_every": 1}, eval={"max_blocks": 1}).run()
    # Per checkpoint: the RNG state, the trainer state, and the manifest last.
    assert order == ["rng_state_0.json", "trainer_state.json", "manifest.json"] * 2
    final = run / "checkpoints" / STEP(2)
    assert final.parent in synced  # the rename into place is made durable too
    assert ckpt.checkpoint_problems(final) == []


def _damage(folder: Path, kind: str) -> str:
    """Damage a copied checkpoint; returns the text its diagnosis must contain."""
    if kind == "missing_model":
        (folder / "model.safetensors").unlink()
        return "model.safetensors is missing"
    if kind == "truncated_state":
        state = folder / "trainer_state.json"
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
        return f"trainer_state.json has {len(data) // 2} bytes, the manifest says {len(data)}"
    if kind == "empty_state":
        size = (folder / "trainer_state.json").stat().st_size
        (folder / "trainer_state.json").write_bytes(b"")
        return f"trainer_state.json has 0 bytes, the manifest says {size}"
    if kind == "missing_rng":
        (folder / "rng_state_0.json").unlink()
        return "rng_state_0.json is missing"
    if kind == "corrupt_weights":  # same size, one byte flipped
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (folder / "model.safetensors").write_bytes(bytes(data))
        return "model.safetensors does not match its sha256"
    if kind == "no_manifest":  # also what an old (pre-manifest) checkpoint looks like
        (folder / ckpt.MANIFEST_FILE).unlink()
        return "before checkpoint manifests"
    if kind == "bad_manifest":
        (folder / ckpt.MANIFEST_FILE).write_text('{"files": ')
        return "manifest.json is damaged"
    raise AssertionError(kind)


KINDS = ["missing_model", "truncated_state", "empty_state", "missing_rng", "corrupt_weights", "no_manifest", "bad_manifest"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_damage_is_named(full_run, tmp_path, kind):
    folder = tmp_path / STEP(6)
    shutil.copytree(full_run / "checkpoints" / STEP(6), folder)
    expected = _damage(folder, kind)
    problems = ckpt.checkpoint_problems(folder)
    assert len(problems) == 1 and expected in problems[0], problems
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify_checkpoint(folder)
    message = str(info.value)
    assert str(folder) in message and expected in message and "--resume PATH" in message
    assert "--num_processes" not in message and "number of processes it was saved with" not in message
    assert isinstance(info.value, MinidistillError)


def test_damaged_latest_falls_back_to_the_previous_complete_one_and_resumes_exactly(full_run, tmp_path, caplog):
    run = _copy_run(full_run, tmp_path / "run")
    root = run / "checkpoints"
    why6 = _damage(root / STEP(6), "truncated_state")
    why4 = _damage(root / STEP(4), "missing_model")
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        chosen = ckpt.resumable_checkpoint(root)
    assert chosen == root / STEP(2)
    warned = caplog.text
    assert str(root / STEP(6)) in warned and why6 in warned and str(root / STEP(4)) in warned and why4 in warned
    assert "previous complete one, step-00000002" in warned
    # The resumed run reproduces the uninterrupted one from step 3 on.
    make_distiller(run, train={"max_steps": 6, "save_every": 2, "keep_last": 3}, eval={"max_blocks": 1}).run(resume=chosen)
    ref = [(r["step"], r["loss"], r["loss/hidden"], r["lr"]) for r in _records(full_run)]
    got = [(r["step"], r["loss"], r["loss/hidden"], r["lr"]) for r in _records(run)]
    assert got == ref and [s for s, *_ in got] == [1, 2, 3, 4, 5, 6]
    assert [ckpt.checkpoint_problems(root / STEP(s)) for s in (2, 4, 6)] == [[], [], []]  # rewritten intact


def test_no_complete_checkpoint_left_names_each_folder_and_problem(full_run, tmp_path):
    run = _copy_run(full_run, tmp_path / "run")
    root = run / "checkpoints"
    why = {s: _damage(root / STEP(s), k) for s, k in ((2, "missing_rng"), (4, "empty_state"), (6, "missing_model"))}
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resumable_checkpoint(root)
    message = str(info.value)
    assert str(root) in message
    for s, text in why.items():
        assert f"{STEP(s)}: " in message and text in message
    assert "--num_processes" not in message
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint .*saved none yet"):
        ckpt.resumable_checkpoint(tmp_path / "nothing")


def test_a_process_count_change_is_named_only_when_it_is_real(full_run, tmp_path):
    folder = tmp_path / STEP(6)
    shutil.copytree(full_run / "checkpoints" / STEP(6), folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    shutil.copy(folder / "rng_state_0.json", folder / "rng_state_1.json")
    shutil.copy(folder / "rng_state_0.safetensors", folder / "rng_state_1.safetensors")
    ckpt.write_manifest(folder, step=6, num_processes=2)
    assert ckpt.checkpoint_problems(folder) == []
    d = make_distiller(tmp_path / "run", train={"max_steps": 6}, eval={"max_blocks": 1})
    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 processes, this run has 1; resume with --num_processes 2"):
        ckpt.load_checkpoint(d.accelerator, folder)
    # The same checkpoint without rank 1's RNG state is damaged, whatever the process count.
    (folder / "rng_state_1.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"rng_state_1\.safetensors is missing") as info:
        ckpt.load_checkpoint(d.accelerator, folder)
    assert "--num_processes" not in str(info.value)


def test_load_checkpoint_verifies_before_load_state(full_run, tmp_path, monkeypatch):
    folder = tmp_path / STEP(4)
    shutil.copytree(full_run / "checkpoints" / STEP(4), folder)
    _damage(folder, "corrupt_weights")
    d = make_distiller(tmp_path / "run", train={"max_steps": 6}, eval={"max_blocks": 1})
    monkeypatch.setattr(d.accelerator, "load_state", lambda *a, **k: pytest.fail("load_state ran on a damaged checkpoint"))
    with pytest.raises(ckpt.CheckpointError, match="does not match its sha256"):
        d.run(resume=folder)


def test_interrupted_cleanup_never_leaves_a_complete_looking_folder(full_run, tmp_path, monkeypatch):
    run = _copy_run(full_run, tmp_path / "run")
    root = run / "checkpoints"
    real_replace = ckpt.os.replace

    def killed(src, dst):  # the process dies right after the manifest is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.remove_checkpoint(root / STEP(6))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert (root / STEP(6) / "trainer_state.json").is_file()  # most files still there...
    assert [p.name for p in ckpt.list_checkpoints(root)] == [STEP(2), STEP(4)]  # ...but it is not a checkpoint
    assert ckpt.resumable_checkpoint(root) == root / STEP(4)
    assert "interrupted while being deleted" in ckpt.checkpoint_problems(root / STEP(6))[0]
    # A completed removal leaves nothing behind.
    ckpt.remove_checkpoint(root / STEP(4))
    assert sorted(p.name for p in root.iterdir()) == [STEP(2), STEP(6)]


def test_trainer_state_parse_errors_name_the_file(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.json is not valid JSON"):
        ckpt.read_trainer_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text("")
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.json is not valid JSON \(empty\)"):
        ckpt.read_trainer_state(tmp_path)
