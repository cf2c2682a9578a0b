"""A fake Hugging Face Hub on a loopback port: exactly the endpoints that huggingface_hub
2.4.0's ``snapshot_download`` (and the ``hf_hub_download`` under it) call, serving repos
from memory and recording every request.

- ``GET /api/models/{repo}/revision/{revision}``: the repo's info, ``sha`` the commit the
  revision (a branch or a commit sha) names (``HfApi.repo_info``);
- ``GET /api/models/{repo}/tree/{revision}?recursive=True``: its files with sizes, one
  page (``HfApi.list_repo_tree``; huggingface_hub caches it on disk per commit);
- ``HEAD`` and ``GET /{repo}/resolve/{revision}/{path}``: a file, with the headers
  ``hf_hub_download`` requires (``X-Repo-Commit``, ``ETag``, ``Content-Length``; LFS files
  also ``X-Linked-Etag`` and ``X-Linked-Size``).

Errors are the Hub's: 404 with ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or
``EntryNotFound``; a gated repo's files answer 401 without a token and 403 with another
than its own (``X-Error-Code: GatedRepo``), its metadata stays public as on the Hub.

Every path may start with ``/c/{client}``: ``FakeHub.endpoint(client)`` gives each process
an ``HF_ENDPOINT`` of its own, so that requests are recorded per client.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

Files = dict[str, bytes]  # path in the repo → content
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")

_CLIENT = re.compile(r"^/c/([^/]+)(/.*)$")
_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/?]+)(?:/.*)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass(frozen=True)
class Request:
    client: str
    method: str  # HEAD or GET
    kind: str  # "info", "tree" or "file"
    repo: str
    revision: str
    path: str  # the file's path for "file", else ""
    status: int


class FakeHub:
    """``repos``: repo id → revision (branch) name → files. ``gated``: repo id → the one
    token that may read its files."""

    def __init__(
        self, repos: dict[str, dict[str, Files]], gated: dict[str, str] | None = None
    ) -> None:
        self.repos = repos
        self.gated = gated or {}
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def endpoint(self, client: str = "default") -> str:
        """An ``HF_ENDPOINT`` whose requests are recorded as ``client``'s."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/c/{client}"

    def sha(self, repo: str, branch: str = "main") -> str:
        """The commit sha a branch of ``repo`` points at: named by the branch and its files,
        so that two repos holding the same files share it (as a fork and its origin do)."""
        digest = hashlib.sha1(branch.encode())
        for path, content in sorted(self.repos[repo][branch].items()):
            digest.update(path.encode() + b"\0" + hashlib.sha256(content).digest())
        return digest.hexdigest()

    def requests(self, client: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if client is None or r.client == client]

    def downloads(self, client: str) -> set[str]:
        """The files ``client`` downloaded (a GET answered 200)."""
        return {
            r.path
            for r in self.requests(client)
            if r.kind == "file" and r.method == "GET" and r.status == 200
        }

    # --- serving -------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = urlsplit(handler.path).path
        client = "default"
        if match := _CLIENT.match(path):
            client, path = match[1], match[2]
        method = "GET" if body else "HEAD"
        if match := _API.match(path):
            repo, what, revision = match[1], match[2], unquote(match[3])
            kind = "info" if what == "revision" else "tree"
            status, headers, content = self._api(kind, repo, revision)
            file = ""
        elif match := _RESOLVE.match(path):
            kind, repo, revision, file = "file", match[1], unquote(match[2]), unquote(match[3])
            auth = handler.headers.get("Authorization")
            status, headers, content = self._file(repo, revision, file, auth)
        else:
            kind, repo, revision, file = "other", "", "", path
            status, headers, content = 404, {}, b"not a Hub endpoint"
        with self._lock:
            self._requests.append(Request(client, method, kind, repo, revision, file, status))
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if body:
            handler.wfile.write(content)

    def _commit(self, repo: str, revision: str) -> tuple[str, Files] | None:
        for branch, files in self.repos[repo].items():
            sha = self.sha(repo, branch)
            if revision in (branch, sha):
                return sha, files
        return None

    def _api(self, kind: str, repo: str, revision: str) -> tuple[int, dict[str, str], bytes]:
        if repo not in self.repos:
            return _error(404, "RepoNotFound", f"Repository {repo} not found")
        found = self._commit(repo, revision)
        if found is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = found
        if kind == "info":
            data: Any = {
                "id": repo,
                "sha": sha,
                "private": False,
                "gated": "manual" if repo in self.gated else False,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            }
        else:
            data = [_tree_entry(p, c) for p, c in sorted(files.items())]
        return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _file(
        self, repo: str, revision: str, file: str, auth: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if repo not in self.repos:
            return _error(404, "RepoNotFound", f"Repository {repo} not found")
        token = self.gated.get(repo)
        if token is not None and auth != f"Bearer {token}":
            return _error(
                403 if auth else 401,
                "GatedRepo",
                f"Access to model {repo} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )
        found = self._commit(repo, revision)
        if found is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = found
        if file not in files:
            status, headers, content = _error(404, "EntryNotFound", f"{file} does not exist")
            return status, {**headers, "X-Repo-Commit": sha}, content
        content = files[file]
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": etag,
        }
        if file.endswith(LFS_SUFFIXES):
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(len(content))}
        return 200, headers, content


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    return status, headers, json.dumps({"error": message}).encode()


def _tree_entry(path: str, content: bytes) -> dict[str, Any]:
    blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(content), "oid": blob}
    if path.endswith(LFS_SUFFIXES):
        sha256 = hashlib.sha256(content).hexdigest()
        entry["lfs"] = {"oid": sha256, "size": len(content), "pointerSize": 134}
    return entry


# --- repos from model folders --------------------------------------------------------

# What resolving a Hub id downloads of a repo of ``tests.tiny_model``'s model, per-block
# sharded: config, tokenizer files and the safetensors index.
TINY_META = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
    }
)


def folder_files(folder: Path) -> Files:
    """Every file under ``folder`` by its path relative to it."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def shard_per_block(folder: Path, out: Path) -> Path:
    """``folder`` (a saved model with one ``model.safetensors``) rewritten to ``out`` with
    the index and one shard per block, as the Hub's sharded checkpoints are: shard 1 the
    embedding, 2 .. N+1 the blocks, the last the final norm and LM head."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for file in folder.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            shutil.copy(file, out / file.name)
    tensors = load_file(folder / "model.safetensors")
    blocks = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    count = blocks + 2

    def shard_of(name: str) -> int:
        if name.startswith("model.embed_tokens."):
            return 1
        if name.startswith("model.layers."):
            return 2 + int(name.split(".")[2])
        return count

    weight_map = {n: shard_name(shard_of(n), count) for n in tensors}
    for index in range(1, count + 1):
        part = {n: t for n, t in tensors.items() if shard_of(n) == index}
        save_file(part, out / shard_name(index, count), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return out


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


# --- pointing huggingface_hub at it --------------------------------------------------


def hub_env(
    endpoint: str, home: Path, *, offline: bool = False, token: str | None = None
) -> dict[str, str]:
    """The environment of a child process that uses the fake Hub and its own cache."""
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": token or "",
    }
    return env


def use_hub(
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
    home: Path,
    *,
    offline: bool = False,
    token: str | None = None,
) -> None:
    """Point this process's huggingface_hub at ``endpoint`` with the cache in ``home``:
    what ``hub_env`` does for a child, for the constants huggingface_hub read at import."""
    from huggingface_hub import constants

    for name, value in hub_env(endpoint, home, offline=offline, token=token).items():
        monkeypatch.setenv(name, value)
    if not token:
        monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
