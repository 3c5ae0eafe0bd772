"""A loopback server that answers as the Hugging Face Hub does (downloads, and the create-repo,
preupload and commit calls of an upload, every file uploaded inline) and as the reference's
download site does, with fixtures that point every cache and download at it. No network."""
import base64
import dataclasses
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeHub(ThreadingHTTPServer):
    """Serves /{repo}/resolve/{revision}/{file} with the Hub's headers (X-Repo-Commit, ETag,
    Content-Length), plain files under /ref/, and takes uploads (a commit's files become the repo's
    main). Records every request."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.refs, self.raw, self.corrupt, self.repos = {}, {}, {}, {}, {}
        self.requests = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self):
        for table in (self.files, self.refs, self.raw, self.corrupt, self.repos, self.requests):
            table.clear()

    def commit(self, repo, files):
        """A new commit of ``repo`` holding its main's files plus ``files`` ({path: bytes})."""
        parent = self.refs.get((repo, "main"))
        tree = {name: data for (r, c, name), data in self.files.items() if r == repo and c == parent}
        tree.update(files)
        oid = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in tree.items())).encode()
                           + (parent or "").encode()).hexdigest()
        for name, data in tree.items():
            self.files[(repo, oid, name)] = data
        self.refs[(repo, "main")] = oid
        return oid

    def gets(self, fragment=""):
        return [p for m, p, _ in self.requests if m == "GET" and fragment in p]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def do_POST(self):
        hub = self.server
        path = urllib.parse.unquote(self.path.split("?")[0])
        hub.requests.append(("POST", path, self.headers.get("User-Agent", "")))
        body = self._body()
        reply = None
        commit = re.fullmatch(r"/api/models/(.+)/commit/main", path)
        if path == "/api/repos/create":
            info = json.loads(body)
            repo = "/".join(p for p in (info.get("organization"), info["name"]) if p)
            hub.repos[repo] = info
            reply = {"url": f"{hub.url}/{repo}"}
        elif path == "/api/validate-yaml":  # the model card's metadata
            reply = {"warnings": [], "errors": []}
        elif re.fullmatch(r"/api/models/(.+)/preupload/main", path):
            reply = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                               for f in json.loads(body)["files"]]}
        elif commit:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
            oid = hub.commit(commit.group(1), files)
            reply = {"commitUrl": f"{hub.url}/{commit.group(1)}/commit/{oid}", "commitOid": oid, "success": True}
        data = json.dumps(reply).encode()
        self.send_response(200 if reply is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _serve(self, body):
        hub = self.server
        path = urllib.parse.unquote(self.path.split("?")[0])
        hub.requests.append((self.command, path, self.headers.get("User-Agent", "")))
        headers = {}
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, rev, name = m.groups()
            commit = hub.refs.get((repo, rev), rev)
            data = hub.files.get((repo, commit, name))
            headers["X-Repo-Commit"] = commit
            if data is not None:
                headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
        else:
            data = hub.raw.get(path)
        if data is None:
            self.send_response(404)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body and hub.corrupt.get(path):
            hub.corrupt[path] -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # same size: only a checksum notices
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture(scope="module")
def hub():
    server = FakeHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopper = threading.Timer(600, server.shutdown)  # stops by itself should teardown never run
    stopper.daemon = True
    stopper.start()
    yield server
    stopper.cancel()
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def env(hub, tmp_path, monkeypatch):
    """Every cache in tmp_path, every download from the loopback server, online."""
    from huggingface_hub import constants
    hub.reset()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HRNETDET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HRNETDET_REFERENCE_URL", hub.url + "/ref")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return tmp_path


def serve_reference(hub, monkeypatch, data, record):
    """Patch the weight record ``record`` ("arch.tag") so that its reference file name carries the
    sha256 prefix of ``data``, and serve ``data`` there; returns (the patched record, its served path)."""
    from hrnetdet.zoo import get_pretrained_cfg, registry
    cfg = get_pretrained_cfg(record)
    prefix = hashlib.sha256(data).hexdigest()[:8]
    cfg = dataclasses.replace(cfg, reference_file=re.sub(r"-[0-9a-f]{8}\.pth$", f"-{prefix}.pth", cfg.reference_file))
    monkeypatch.setitem(registry._pretrained, cfg.arch,
                        [cfg if c.tag == cfg.tag else c for c in registry._pretrained[cfg.arch]])
    path = urllib.parse.urlparse(cfg.reference_url_at(hub.url + "/ref")).path
    hub.raw[path] = data
    return cfg, path
