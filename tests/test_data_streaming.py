"""data/sources.py: a prepared corpus read from an http(s) URL (a local server on 127.0.0.1) or a
pipe: command, giving the same batches and resume as from its directory, with one-line errors."""

from __future__ import annotations

import functools
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from data import sources
from data.loader import TokenLoader
from data.shards import ShardError
from data.sources import SourceError
from tests.test_data_workers import UNEVEN, _assert_same, _corrupt, _synthetic_corpus, _take

KW = dict(seq_len=8, batch_size=3, dp_rank=1, dp_size=2, seed=5)  # epochs of 16 batches


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's directory; `faults` (URL path -> list of "503" / "cut") answers the
    next requests of a path with an HTTP 503 or a body cut off halfway."""

    faults: dict[str, list[str]] = {}
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        fault = self.faults.get(self.path)
        if not fault:
            return super().do_GET()
        kind = fault.pop(0)
        if kind == "503":
            self.send_error(503, "Service Unavailable")
            return
        body = Path(self.directory, self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(root directory, its base URL): an http.server on an ephemeral port, in a thread."""
    root = tmp_path_factory.mktemp("served")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def corpus(server, request):
    """A corpus of 8 shards (data/ test_data_workers' corpus) in the served root, and its three names."""
    root, url = server
    name = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    _synthetic_corpus(root / name, UNEVEN + [776 - 631 - 1], shard_tokens=97)
    _Handler.faults.clear()
    return {"local": root / name, "http": f"{url}/{name}", "pipe": f"pipe:cat {root / name}/{{file}}"}


@pytest.mark.parametrize("kind", ["http", "pipe"])
@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_local_ones(corpus, kind, workers):
    reference = _take(TokenLoader(corpus["local"], **KW), 40)
    streamed = TokenLoader(corpus[kind], num_workers=workers, **KW)
    assert streamed.manifest_sha256 == TokenLoader(corpus["local"], **KW).manifest_sha256
    _assert_same(_take(streamed, 40), reference)  # 2.5 epochs: every shard read, some again
    streamed.close()


@pytest.mark.parametrize("kind", ["http", "pipe"])
@pytest.mark.parametrize("workers_before,workers_after", [(0, 2), (2, 0)])
def test_streamed_resume_is_exact_at_any_worker_count(corpus, kind, workers_before, workers_after):
    reference = _take(TokenLoader(corpus["local"], **KW), 37)
    run = TokenLoader(corpus[kind], num_workers=workers_before, **KW)
    _take(run, 21)
    state = json.loads(json.dumps(run.state_dict()))
    run.close()
    resumed = TokenLoader(corpus[kind], num_workers=workers_after, **KW)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 16), reference[21:])
    resumed.close()
    local = TokenLoader(corpus["local"], **KW)  # a state saved from a URL resumes from the directory too
    local.load_state_dict(state)
    _assert_same(_take(local, 2), reference[21:23])


@pytest.mark.parametrize("kind,workers", [("http", 0), ("http", 2), ("pipe", 0)])
def test_a_corrupt_streamed_shard_names_the_shard_and_its_url(corpus, kind, workers):
    _corrupt(corpus["local"] / "train-000005.tar")
    loader = TokenLoader(corpus[kind], 8, 3, seed=0, num_workers=workers)
    where = corpus[kind].replace("{file}", "train-000005.tar") if kind == "pipe" else \
        f"{corpus[kind]}/train-000005.tar"  # the URL, or the command that printed it
    with pytest.raises(ShardError, match=f"shard {re.escape(where)} is corrupt: its sha256 does not match "
                                         f"manifest.json") as info:
        _take(loader, loader.batches_per_epoch)
    assert "\n" not in str(info.value)
    loader.close()


def test_skip_policy_serves_other_windows_for_a_bad_streamed_shard(corpus, capsys):
    _corrupt(corpus["local"] / "train-000002.tar")
    kw = {**KW, "on_bad_shard": "skip"}
    local, streamed = TokenLoader(corpus["local"], **kw), TokenLoader(corpus["http"], **kw)
    _assert_same(_take(streamed, 32), _take(local, 32))
    assert streamed.bad_shards == [f"{corpus['http']}/train-000002.tar"]
    assert f"data: skipping bad shard {corpus['http']}/train-000002.tar" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_an_unreachable_url_a_missing_file_and_a_failing_command_are_one_line(corpus, tmp_path):
    port = _closed_port()
    cases = [
        (f"http://127.0.0.1:{port}/corpus", rf"cannot read http://127\.0\.0\.1:{port}/corpus/manifest\.json: "
                                            r"Connection refused; the data must be a prepared directory, its base URL"),
        (corpus["http"] + "/nowhere", r"cannot read http://.*/nowhere/manifest\.json: HTTP 404"),
        (f"pipe:cat {tmp_path}/{{file}}", rf"pipe command `cat {tmp_path}/manifest\.json` exited with status 1: "
                                          r"cat: .*: No such file or directory"),
        ("pipe:cat /data/shards", r"has no \{file\} in its command"),
    ]
    for spec, expected in cases:
        with pytest.raises(SourceError, match=expected) as info:
            TokenLoader(spec, 8, 3)
        assert "\n" not in str(info.value), spec
    (corpus["local"] / "train-000003.tar").unlink()
    for kind, expected in (("http", r"shard train-000003\.tar: cannot read http://.*/train-000003\.tar: HTTP 404"),
                           ("pipe", r"shard train-000003\.tar: pipe command `cat .*/train-000003\.tar` exited "
                                    r"with status 1: cat: .*No such file or directory")):
        loader = TokenLoader(corpus[kind], 8, 3, seed=0)
        with pytest.raises(ShardError, match=expected) as info:
            _take(loader, loader.batches_per_epoch)
        assert "\n" not in str(info.value)


def test_a_manifest_file_name_cannot_reach_a_url_path_or_a_shell(corpus):
    manifest = json.loads((corpus["local"] / "manifest.json").read_text())
    manifest["train"]["shards"][0]["file"] = "x.tar; touch /tmp/s14-injected"
    (corpus["local"] / "manifest.json").write_text(json.dumps(manifest))
    loader = TokenLoader(corpus["pipe"], 8, 3, seed=0)
    with pytest.raises(ShardError, match=r"file name 'x\.tar; touch .*' in the manifest is not a plain file name"):
        _take(loader, loader.batches_per_epoch)
    assert not Path("/tmp/s14-injected").exists()


def test_transient_http_errors_are_retried_a_bounded_number_of_times(corpus, monkeypatch):
    monkeypatch.setattr(sources, "RETRY_DELAY_S", 0.01)
    name = corpus["http"].rsplit("/", 1)[1]
    shard = f"/{name}/train-000004.tar"
    _Handler.faults[shard] = ["503", "cut", "503"]  # then served
    reference = _take(TokenLoader(corpus["local"], 8, 3, seed=0), 32)
    _assert_same(_take(TokenLoader(corpus["http"], 8, 3, seed=0), 32), reference)
    assert _Handler.requests.count(shard) == 4
    _Handler.faults[shard] = ["503"] * 4  # more than HTTP_RETRIES = 3
    loader = TokenLoader(corpus["http"], 8, 3, seed=0)
    with pytest.raises(ShardError, match=r"shard train-000004\.tar: cannot read http://.*/train-000004\.tar: "
                                         r"HTTP 503 Service Unavailable \(after 3 retries\)"):
        _take(loader, 32)


def test_eval_reads_a_split_from_a_pipe(cli_data):
    from data.tokenizer import Tokenizer
    from pretrain.evaluate import split_tokens

    tokenizer = Tokenizer(cli_data / "tokenizer.model")
    np.testing.assert_array_equal(split_tokens(f"pipe:cat {cli_data}/{{file}}", "train", tokenizer),
                                  split_tokens(cli_data, "train", tokenizer))


def test_launch_train_and_export_with_data_path_a_url(server, cli_data, tmp_path):
    """A few steps of launch.train reading http://...; export then fetches the tokenizer from there."""
    import shutil

    from trainer_cli import run, train

    root, url = server
    shutil.copytree(cli_data, root / "cli")
    out = train(tmp_path / "run", "train.max_steps=3", "train.save_every=3", "data.num_workers=2",
                data=f"{url}/cli").stdout
    assert "done:" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    run(["-m", "launch.export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == (cli_data / "tokenizer.model").read_bytes()
    bad = train(tmp_path / "run2", data=f"http://127.0.0.1:{_closed_port()}/cli", check=False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("train: error: data.path: cannot read http://127.0.0.1:"), lines[0]
