"""A local stand-in for the Hugging Face Hub HTTP API, enough for ``HfApi.create_repo``,
``create_branch`` and ``create_commit`` (preupload, LFS batch / basic upload / verify, NDJSON commit).

Start with ``with HubStub(token="hf_x") as hub: HfApi(endpoint=hub.url, token="hf_x")``. Files land
in ``hub.files(repo_id, branch)`` as bytes. ``hub.fail(kind, mode, times)`` makes the next ``times``
requests of ``kind`` (``create``, ``branch``, ``preupload``, ``lfs_batch``, ``lfs_upload``,
``lfs_verify``, ``commit``) answer 500 (``mode="500"``) or drop the connection mid-request
(``mode="drop"``). Every request is recorded in ``hub.requests`` as (method, path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>.+)$"), "branch"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>.+)$"), "preupload"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    ("POST", re.compile(r"^/lfs-verify$"), "lfs_verify"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>.+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(/revision/(?P<rev>.+))?$"), "repo_info"),
]


class HubStub:
    """A threaded HTTP server on 127.0.0.1 that keeps repos in memory."""

    def __init__(self, token: str, *, lfs_threshold: int = 1 << 20):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, dict] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self._failures: dict[str, list] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, kind: str, mode: str = "500", times: int = 1) -> None:
        """Make the next ``times`` requests of ``kind`` fail with ``mode`` (``"500"`` or ``"drop"``)."""
        self._failures[kind] = [mode, times]

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """Committed files of ``repo_id`` at ``branch`` (LFS files resolved to their content)."""
        return dict(self.repos[repo_id]["branches"][branch]["files"])

    def _take_failure(self, kind: str) -> str | None:
        with self._lock:
            entry = self._failures.get(kind)
            if not entry or entry[1] <= 0:
                return None
            entry[1] -= 1
            return entry[0]


def _make_handler(hub: HubStub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        # -------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _drop(self) -> None:
            # Read a little of the request, then close the socket without answering.
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 16))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _dispatch(self, method: str) -> None:
            path = urlparse(self.path).path
            hub.requests.append((method, path))
            for m, pattern, kind in _ROUTES:
                match = pattern.match(path) if m == method else None
                if match:
                    break
            else:
                self._body()
                return self._send(404, {"error": f"no route {method} {path}"})
            # LFS uploads go to a pre-signed storage URL (no Authorization header), as on the Hub.
            if kind not in ("validate_yaml", "lfs_upload") and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._body()
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            failure = hub._take_failure(kind)
            if failure == "drop":
                return self._drop()
            body = self._body()
            if failure == "500":
                return self._send(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            status, payload = getattr(self, f"_{kind}")(body, **params)
            self._send(status, payload)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # -------------------------------------------------------------- endpoints
        def _create(self, body: bytes):
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            url = f"{hub.url}/{repo_id}"
            with hub._lock:
                if repo_id in hub.repos:
                    return 409, {"error": "You already created this model repo", "url": url}
                hub.repos[repo_id] = {
                    "private": req.get("visibility") == "private" or bool(req.get("private")),
                    "branches": {"main": {"files": {}, "sha": "0" * 40}},
                }
            return 200, {"url": url, "name": repo_id}

        def _repo(self, repo: str):
            return hub.repos.get(repo)

        def _branch(self, body: bytes, repo: str, rev: str):
            r = self._repo(repo)
            if r is None:
                return 404, {"error": "Repository not found"}
            with hub._lock:
                if rev in r["branches"]:
                    return 409, {"error": f"Reference {rev} already exists"}
                src = r["branches"]["main"]
                r["branches"][rev] = {"files": dict(src["files"]), "sha": src["sha"]}
            return 200, {}

        def _validate_yaml(self, body: bytes):
            content = json.loads(body)["content"]
            if content.startswith("---"):
                try:
                    yaml.safe_load(content.split("---")[1])
                except yaml.YAMLError as err:
                    return 400, {"errors": [{"message": str(err)}]}
            return 200, {"errors": [], "warnings": []}

        def _preupload(self, body: bytes, repo: str, rev: str):
            r = self._repo(repo)
            if r is None or rev not in r["branches"]:
                return 404, {"error": "Repository or revision not found"}
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["size"] >= hub.lfs_threshold or f["path"].endswith(".safetensors")
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
            return 200, {"files": files, "commitOid": r["branches"][rev]["sha"]}

        def _lfs_batch(self, body: bytes, repo: str):
            if self._repo(repo) is None:
                return 404, {"message": "Repository not found"}
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs-verify"},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}

        def _lfs_upload(self, body: bytes, oid: str):
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 of the uploaded content does not match the oid"}
            hub.lfs_objects[oid] = body
            return 200, {}

        def _lfs_verify(self, body: bytes):
            req = json.loads(body)
            data = hub.lfs_objects.get(req["oid"])
            if data is None or len(data) != req["size"]:
                return 404, {"error": "object not found"}
            return 200, {}

        def _commit(self, body: bytes, repo: str, rev: str):
            r = self._repo(repo)
            if r is None or rev not in r["branches"]:
                return 404, {"error": "Repository or revision not found"}
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]
            if header.get("key") != "header" or not header["value"].get("summary"):
                return 400, {"error": "first NDJSON line must be the commit header"}
            changes: dict[str, bytes] = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    data = hub.lfs_objects.get(value["oid"])
                    if data is None:
                        return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                    changes[value["path"]] = data
                else:
                    return 400, {"error": f"unsupported operation {line['key']}"}
            with hub._lock:
                branch = r["branches"][rev]
                branch["files"].update(changes)
                sha = hashlib.sha1(branch["sha"].encode() + json.dumps(sorted(changes)).encode()).hexdigest()
                branch["sha"] = sha
                hub.commits.append({"repo": repo, "branch": rev, "message": header["value"]["summary"], "oid": sha})
            return 200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True}

        def _repo_info(self, body: bytes, repo: str, rev: str = "main"):
            r = self._repo(repo)
            if r is None or rev not in r["branches"]:
                return 404, {"error": "Repository not found"}
            files = r["branches"][rev]["files"]
            return 200, {
                "id": repo,
                "sha": r["branches"][rev]["sha"],
                "private": r["private"],
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }

    return Handler
