"""A loopback stand-in for the parts of the Hugging Face Hub API that `lora-scripts publish` uses.

Serves the real huggingface_hub client (``HF_ENDPOINT=hub.url``, ``HF_HUB_DISABLE_XET=1``) over HTTP
on 127.0.0.1: repo creation, repo info, README YAML validation, preupload (LFS or regular, with the
stored file's oid so unchanged files are skipped), the LFS batch API with basic transfer (PUT to
the stand-in), ndjson commits, refs and tags. Every API call needs ``Authorization: Bearer <token>``
(401 otherwise); the LFS upload URL is pre-authorised like a presigned storage URL. State and the
request log are plain attributes for tests to inspect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".jpg", ".jpeg", ".webp")
REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256 of LFS files
    commits: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def oid(self, path: str) -> str | None:
        if path in self.lfs:
            return self.lfs[path]
        return git_blob_oid(self.files[path]) if path in self.files else None


class HubStandIn:
    """Start with ``with HubStandIn(token) as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.headers_seen: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _commit(self, repo: Repo, message: str) -> str:
        oid = hashlib.sha1(f"{len(repo.commits)}:{message}:{sorted(repo.files)}".encode()).hexdigest()
        repo.commits.append(oid)
        return oid

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """Answer one API call: (status, JSON-able body)."""
        if m := re.fullmatch(r"/_lfs/(?P<oid>[0-9a-f]{64})", path):
            if method != "PUT" or hashlib.sha256(body).hexdigest() != m["oid"]:
                return 400, {"error": "content does not match oid"}
            self.lfs_store[m["oid"]] = body
            return 200, {}
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            repo = self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            repo.files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self._commit(repo, "initial commit")
            return 200, {"url": f"{self.url}/{repo_id}"}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            front = content.split("---")[1] if content.startswith("---") else ""
            try:
                meta = yaml.safe_load(front) or {}
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": str(err)}]}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}]}
            return 200, {"errors": [], "warnings": []}
        if m := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path):
            if m["repo"] not in self.repos:
                return 404, {"error": "Repository not found"}
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.lfs_store:
                    entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"}}
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}
        m = re.fullmatch(rf"/api/models/{REPO}(?P<rest>/.*)?", path)
        if not m or m["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        repo, rest = self.repos[m["repo"]], m["rest"] or ""
        if method == "GET" and (rest == "" or rest.startswith("/revision/")):
            siblings = [{"rfilename": name} for name in sorted(repo.files)]
            return 200, {"id": m["repo"], "sha": repo.commits[-1], "private": repo.private, "siblings": siblings}
        if method == "POST" and rest.startswith("/preupload/"):
            files = []
            for item in json.loads(body)["files"]:
                sample = base64.b64decode(item["sample"])
                lfs = item["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample
                files.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": repo.oid(item["path"]),
                    }
                )
            return 200, {"files": files}
        if method == "POST" and rest.startswith("/commit/"):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                    repo.lfs.pop(value["path"], None)
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.lfs_store:
                        return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                    repo.files[value["path"]] = self.lfs_store[value["oid"]]
                    repo.lfs[value["path"]] = value["oid"]
            oid = self._commit(repo, header["summary"])
            return 200, {"commitUrl": f"{self.url}/{m['repo']}/commit/{oid}", "commitOid": oid}
        if method == "GET" and rest == "/refs":
            main = {"name": "main", "ref": "refs/heads/main", "targetCommit": repo.commits[-1]}
            tags = [{"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid} for name, oid in repo.tags.items()]
            return 200, {"branches": [main], "converts": [], "tags": tags}
        if method == "POST" and rest.startswith("/tag/"):
            revision = unquote(rest.removeprefix("/tag/"))
            tag = json.loads(body)["tag"]
            if tag in repo.tags:
                return 409, {"error": f"Tag {tag} already exists"}
            repo.tags[tag] = repo.commits[-1] if revision == "main" else revision
            return 200, {}
        return 404, {"error": f"stand-in does not implement {method} {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def _serve(self) -> None:
                body = self._body()
                path = urlparse(self.path).path
                hub.requests.append((self.command, path))
                hub.headers_seen.append(self.headers.get("Authorization", ""))
                if not path.startswith("/_lfs/") and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    status, payload = 401, {"error": "Invalid credentials in Authorization header"}
                else:
                    status, payload = hub._route(self.command, path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", payload.get("error", ""))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

        return Handler
