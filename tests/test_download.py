"""Downloads over real HTTP on 127.0.0.1: progress, resume with Range, md5, errors."""

import hashlib
import http.server
import threading

import pytest

from diffusion.platform.shards import ShardSet
from diffusion.platform.sources import DataError, download
from helpers import cli, free_port, write_cifar10


@pytest.fixture
def http_files(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 with Range support; records the Range headers it saw."""
    www = tmp_path / "www"
    www.mkdir()
    ranges = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = www / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            if self.headers.get("Range"):
                ranges.append(self.headers["Range"])
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", ranges
    server.shutdown()


def test_download_resumes_a_partial_file_and_checks_md5(tmp_path, http_files):
    www, url, ranges = http_files
    payload = bytes(range(256)) * 5000
    (www / "a.bin").write_bytes(payload)
    md5 = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "dl" / "a.bin"
    dest.parent.mkdir()
    (tmp_path / "dl" / "a.bin.part").write_bytes(payload[:300_000])  # an interrupted earlier download
    assert download(f"{url}/a.bin", dest, md5) == dest
    assert dest.read_bytes() == payload and ranges == ["bytes=300000-"]
    assert not (tmp_path / "dl" / "a.bin.part").exists()


def test_download_with_a_wrong_md5_leaves_nothing(tmp_path, http_files):
    www, url, _ = http_files
    (www / "a.bin").write_bytes(b"x" * 1000)
    dest = tmp_path / "a.bin"
    with pytest.raises(DataError, match="does not match the expected 0123"):
        download(f"{url}/a.bin", dest, "0123" + "0" * 28)
    assert not dest.exists() and not (tmp_path / "a.bin.part").exists()
    with pytest.raises(DataError, match="HTTP 404. Pass --source with a local copy"):
        download(f"{url}/missing.bin", dest, None)
    with pytest.raises(DataError, match=r"cannot download .*Pass --source with a local copy of a.bin"):
        download(f"http://127.0.0.1:{free_port()}/a.bin", dest, None)


def test_prepare_downloads_from_a_url(tmp_path, http_files):
    www, url, _ = http_files
    write_cifar10(www / "cifar-10-python.tar.gz", per_batch=2)
    md5 = hashlib.md5((www / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    out = tmp_path / "shards"
    args = ["--dataset", "cifar10", "--source", f"{url}/cifar-10-python.tar.gz", "--md5", md5]
    proc = cli("jobs/prepare_data.py", *args, "--cache-dir", tmp_path / "cache", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "downloading cifar-10-python.tar.gz" in proc.stderr
    assert (tmp_path / "cache" / "cifar-10-python.tar.gz").exists()
    assert len(ShardSet.open(str(out))) == 10
