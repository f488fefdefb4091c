"""Hub push against a local HTTP stub driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants
from hub_stub import HubStub

from minidistill.publish import hub as hub_module
from minidistill.config import ConfigError
from minidistill.publish.hub import HubConfig, HubError, push_to_hub, run_folder_files

TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"
REPO = "someone/tiny-distilled"


@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub talk to the local stub: offline mode off, Xet off (plain LFS)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def stub(online):
    with HubStub(token=TOKEN, lfs_threshold=64 * 1024) as server:
        yield server


@pytest.fixture
def run_folder(tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(os.urandom(300 * 1024))  # LFS
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')  # regular
    (folder / "extra").mkdir()
    (folder / "extra" / "big.txt").write_bytes(b"x" * (100 * 1024))  # LFS by size, in a subfolder
    (folder / ".hidden").write_text("not pushed")
    (folder / "prune_map.json").write_text(json.dumps({
        "teacher": {"source": "bundled", "shape": {"num_layers": 4}}, "student_shape": {"num_layers": 2},
        "kept_layers": [0, 3], "kept_hidden": [0, 1], "layers": [],
    }))
    return folder


PUSHED = ("config.json", "model.safetensors", "tokenizer.json", "extra/big.txt", "prune_map.json")


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_uploads_regular_and_lfs_files_byte_for_byte(stub, run_folder):
    card = ModelCard("---\nlicense: apache-2.0\ntags:\n- minidistill\n---\n\n# tiny\n")
    before = folder_digest(run_folder)
    url = push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url, commit_message="first upload"), card=card, token=TOKEN)
    assert url == f"{stub.url}/{REPO}/commit/{stub.commits[-1]['oid']}"
    remote = stub.files(REPO)
    for rel in PUSHED:
        assert remote[rel] == (run_folder / rel).read_bytes()
    assert remote["README.md"] == str(card).encode()
    assert ".hidden" not in remote
    assert stub.commits[-1]["message"] == "first upload" and len(stub.commits) == 1
    assert len(stub.lfs_objects) == 2  # the two large files went through LFS
    assert ("POST", f"/{REPO}.git/info/lfs/objects/batch") in stub.requests
    assert folder_digest(run_folder) == before  # README.md went through the commit, not the folder
    assert not (run_folder / "README.md").exists()


def test_push_to_branch_creates_it(stub, run_folder):
    assert stub.repos == {}
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url, revision="experiment"), token=TOKEN)
    assert stub.files(REPO, "experiment")["model.safetensors"] == (run_folder / "model.safetensors").read_bytes()
    assert stub.files(REPO, "main") == {}
    # Without a card one is generated from the run's prune_map.json.
    card = ModelCard(stub.files(REPO, "experiment")["README.md"].decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "kept layers (2): [0, 3]" in card.text
    # Existing repo and branch: a second push still works.
    (run_folder / "tokenizer.json").write_text('{"version": "2.0"}\n')
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url, revision="experiment"), token=TOKEN)
    assert stub.files(REPO, "experiment")["tokenizer.json"] == b'{"version": "2.0"}\n'
    assert [c["branch"] for c in stub.commits] == ["experiment", "experiment"]


def test_token_never_printed_or_logged(stub, run_folder, caplog, capfd, monkeypatch):
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # the client's most verbose request logging
    caplog.set_level(logging.DEBUG)
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    stub.fail("commit", "500")
    with pytest.raises(HubError) as info:
        push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    out, err = capfd.readouterr()
    assert caplog.records, "expected some logging to inspect"
    for text in (caplog.text, out, err, str(info.value)):
        assert TOKEN not in text


def test_token_from_env(stub, run_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url))
    assert stub.files(REPO)["config.json"] == (run_folder / "config.json").read_bytes()


def test_token_from_login_cache(stub, run_folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token_file = tmp_path / "hf_home" / "token"
    token_file.parent.mkdir()
    token_file.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url))
    assert stub.commits and stub.files(REPO)["config.json"] == (run_folder / "config.json").read_bytes()


def test_no_card_source_refused_before_any_request(stub, run_folder):
    (run_folder / "prune_map.json").unlink()
    with pytest.raises(HubError, match="--teacher"):
        push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    assert stub.requests == []
    (run_folder / "README.md").write_text("# my own card\n")
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    assert stub.files(REPO)["README.md"] == b"# my own card\n"


def test_no_token_fails_before_any_request(stub, run_folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_module, "get_token", lambda: None)
    with pytest.raises(HubError, match="HF_TOKEN") as info:
        push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url))
    assert "login" in str(info.value)
    assert stub.requests == []


@pytest.mark.parametrize("broken", ["no_config", "no_weights", "pickle", "missing_shard", "tmp_entry", "not_a_folder"])
def test_unfinished_folder_refused_before_any_request(stub, run_folder, broken):
    target = run_folder
    if broken == "no_config":
        (run_folder / "config.json").unlink()
    elif broken == "no_weights":
        (run_folder / "model.safetensors").unlink()
    elif broken == "pickle":
        (run_folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif broken == "missing_shard":
        (run_folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00002-of-00002.safetensors"}}')
    elif broken == "tmp_entry":
        (run_folder / ".tmp-abc").mkdir()
    else:
        target = run_folder / "config.json"
    with pytest.raises(HubError):
        push_to_hub(target, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    assert stub.requests == []


@pytest.mark.parametrize("kind,mode", [("commit", "500"), ("commit", "drop"), ("create", "500"), ("create", "drop")])
def test_server_failure_is_clear_and_retry_completes(stub, run_folder, kind, mode):
    before = folder_digest(run_folder)
    stub.fail(kind, mode, times=1)
    with pytest.raises(HubError, match="run the same command again") as info:
        push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    assert ("500" in str(info.value)) if mode == "500" else ("disconnected" in str(info.value).lower())
    assert folder_digest(run_folder) == before
    assert stub.commits == []
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    remote = stub.files(REPO)
    for rel in PUSHED:
        assert remote[rel] == (run_folder / rel).read_bytes()
    assert folder_digest(run_folder) == before


def test_retry_after_commit_failure_skips_uploaded_lfs(stub, run_folder):
    stub.fail("commit", "500")
    with pytest.raises(HubError):
        push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    uploads = sum(1 for m, p in stub.requests if m == "PUT")
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    assert sum(1 for m, p in stub.requests if m == "PUT") == uploads == 2


def test_config_validation():
    with pytest.raises(ConfigError, match="hub.repo_id"):
        HubConfig(repo_id="no-slash").validate()
    with pytest.raises(ConfigError, match="hub.endpoint"):
        HubConfig(repo_id="a/b", endpoint="ftp://x").validate()
    with pytest.raises(ConfigError, match="repo_id is not set"):
        push_to_hub(".", HubConfig(), token=TOKEN)


def test_offline_mode_refused(run_folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(run_folder, HubConfig(repo_id=REPO), token=TOKEN)


def test_run_folder_files_lists_what_is_pushed(run_folder):
    assert [p.as_posix() for p in run_folder_files(run_folder)] == sorted(PUSHED)


def test_push_recipe(stub, run_folder, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("push_recipe", Path(__file__).parents[1] / "recipes" / "push.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rc = recipe.main([str(run_folder), "--repo_id", REPO, "--endpoint", stub.url, "--revision", "v1", "--message", "cli push", "--private"])
    assert rc == 0
    assert capsys.readouterr().out.strip().startswith(f"{stub.url}/{REPO}/commit/")
    card = ModelCard(stub.files(REPO, "v1")["README.md"].decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert stub.repos[REPO]["private"] is True and stub.commits[-1]["message"] == "cli push"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub_module, "get_token", lambda: None)
    assert recipe.main([str(run_folder), "--repo_id", REPO, "--endpoint", stub.url]) == 9  # hub error
    assert "HF_TOKEN" in capsys.readouterr().err


def test_transient_lfs_upload_error_is_retried_by_the_client(stub, run_folder):
    stub.fail("lfs_upload", "500", times=1)
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    assert sum(1 for m, _ in stub.requests if m == "PUT") == 3  # one failed, two succeeded
    assert stub.files(REPO)["model.safetensors"] == (run_folder / "model.safetensors").read_bytes()


def test_symlink_out_of_the_folder_is_refused_before_any_request(stub, run_folder, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub\n")
    (run_folder / "notes.txt").symlink_to(secret)
    with pytest.raises(HubError, match=r"notes\.txt is a symlink to .*secret\.txt, outside .*replace the link with a copy"):
        push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    (run_folder / "notes.txt").unlink()
    (run_folder / "extra" / "up.txt").symlink_to(Path("..") / ".." / "secret.txt")  # relative, climbing out
    with pytest.raises(HubError, match=r"up\.txt is a symlink to .*secret\.txt, outside"):
        run_folder_files(run_folder)
    (run_folder / "extra" / "up.txt").unlink()
    (tmp_path / "elsewhere").mkdir()
    (run_folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(HubError, match=r"linked is a symlink to a folder"):
        run_folder_files(run_folder)
    assert stub.requests == []


def test_symlink_inside_the_folder_uploads_its_target(stub, run_folder):
    (run_folder / "alias.json").symlink_to("tokenizer.json")
    (run_folder / "dangling.json").symlink_to("no-such-file.json")
    with pytest.raises(HubError, match=r"dangling\.json is a symlink to .*no-such-file\.json, which is not a regular file"):
        run_folder_files(run_folder)
    (run_folder / "dangling.json").unlink()
    push_to_hub(run_folder, HubConfig(repo_id=REPO, endpoint=stub.url), token=TOKEN)
    remote = stub.files(REPO)
    assert remote["alias.json"] == (run_folder / "tokenizer.json").read_bytes()
    assert sorted(remote) == sorted([*PUSHED, "alias.json", "README.md"])


def test_sigkill_during_a_push_then_the_same_command_completes(stub, run_folder):
    """recipes/push.py killed mid-upload (SIGKILL), then run again: the second push completes byte for byte."""
    import signal
    import subprocess
    import sys
    import threading

    reached, release = threading.Event(), threading.Event()
    real_take = stub._take_failure

    def hold_first_upload(kind):  # keep the first LFS upload in flight until the client is dead
        if kind == "lfs_upload" and not reached.is_set():
            reached.set()
            release.wait(60)
            return "drop"
        return real_take(kind)

    stub._take_failure = hold_first_upload
    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(repo_root / "recipes" / "push.py"), str(run_folder), "--repo_id", REPO, "--endpoint", stub.url]
    before = folder_digest(run_folder)
    proc = subprocess.Popen(cmd, env=env, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert reached.wait(120), "the push never reached the LFS upload"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert stub.commits == [] and folder_digest(run_folder) == before
    retry = subprocess.run(cmd, env=env, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert retry.stdout.strip().startswith(f"{stub.url}/{REPO}/commit/")
    assert "Traceback" not in retry.stderr and TOKEN not in retry.stdout + retry.stderr
    remote = stub.files(REPO)
    for rel in PUSHED:
        assert remote[rel] == (run_folder / rel).read_bytes()
    assert len(stub.commits) == 1 and folder_digest(run_folder) == before
