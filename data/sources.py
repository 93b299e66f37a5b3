"""Where a prepared corpus is read from: `data.path` (or a data.mix entry) names one of

  a local directory         data/mycorpus                     the files, as prepare wrote them
  an http(s) base URL       https://host/corpora/mycorpus     BASE/manifest.json, BASE/<file>
  a pipe: command template  pipe:aws s3 cp s3://b/c/{file} -  {file}: a manifest-relative file
                                                              name; the command prints the file

(pipe: as in webdataset). A remote file is opened as a stream (`Source.open`) and read once front to
back: nothing is written to local disk. File names are checked against NAME before they reach a URL
or a shell command (prepare writes only such names), so a manifest cannot inject a path or a command.

Errors are one line (SourceError, a FileNotFoundError: what could not be read and why). HTTP errors
that may pass (HTTP 408/429/5xx, a timeout, a connection reset or cut short) are retried
HTTP_RETRIES times, RETRY_DELAY_S apart and doubling, by `Source.read`; an unreachable host, a
404 or a failing pipe command are reported at once.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HTTP_RETRIES = 3
RETRY_DELAY_S = 1.0
HTTP_TIMEOUT_S = 60.0
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20


class SourceError(FileNotFoundError):
    """A file of a data source that cannot be read: unreachable URL, HTTP error, failing command."""


class TransientError(SourceError):
    """An HTTP failure worth retrying (Source.read does)."""


def open_source(spec) -> "Source":
    """The Source that `spec` (a path, an http(s) URL or a pipe: template) names."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, str) and spec.startswith(("http://", "https://")):
        return HttpSource(spec)
    if isinstance(spec, str) and spec.startswith("pipe:"):
        return PipeSource(spec)
    return LocalSource(spec)


class Source:
    """A prepared directory's files by name. `root` is what to pass on to open the same source
    again (a Path for a local directory, the spec string otherwise)."""

    remote = True
    root: str | Path

    def __str__(self) -> str:
        return str(self.root)

    def location(self, name: str) -> str | Path:
        """Where the file `name` is read from (a path, a URL, the command), for messages; only
        open() lets a name through, after checking it."""
        raise NotImplementedError

    def open(self, name: str):
        """A context manager giving a binary stream of the file (read it to the end)."""
        raise NotImplementedError

    def read(self, name: str, consume):
        """consume(stream) on the file, retried from its start on a transient HTTP error."""
        with self.open(name) as stream:
            return consume(stream)

    def read_bytes(self, name: str) -> bytes:
        return self.read(name, lambda stream: stream.read())

    def fetch(self, name: str, dest: Path) -> Path:
        """Copy the file to dest (e.g. the tokenizer, which sentencepiece loads from a path)."""
        def copy(stream):
            with open(dest, "wb") as f:
                while chunk := stream.read(_CHUNK):
                    f.write(chunk)
        self.read(name, copy)
        return dest


class LocalSource(Source):
    remote = False

    def __init__(self, path):
        self.root = self.path = Path(path)

    def location(self, name: str) -> Path:
        return self.path / name

    def open(self, name: str):
        try:
            return open(self.path / name, "rb")
        except OSError as e:
            raise SourceError(f"{self.path / name} cannot be read ({e.strerror})") from None


def _check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise SourceError(f"file name {name!r} in the manifest is not a plain file name "
                          f"(letters, digits, '.', '_', '-'); the manifest is not one prepare_data wrote")
    return name


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in TRANSIENT_HTTP
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else None
    return isinstance(exc, (TimeoutError, socket.timeout, ConnectionResetError, ConnectionAbortedError,
                            BrokenPipeError, http.client.IncompleteRead, http.client.RemoteDisconnected))


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed after {len(exc.partial)} bytes"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _Counted:
    """An HTTP body that raises TransientError when it ends before its Content-Length (http.client's
    read(n) returns b"" then, as if the file had ended)."""

    def __init__(self, response, url: str):
        self.response, self.url, self.got = response, url, 0
        length = response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read(self, n: int = -1) -> bytes:
        data = self.response.read(n if n is not None and n >= 0 else None)
        self.got += len(data)
        if not data and n != 0 and self.length is not None and self.got < self.length:
            raise TransientError(f"reading {self.url} failed: connection closed after {self.got} of "
                                 f"{self.length} bytes")
        return data


class HttpSource(Source):
    def __init__(self, url: str):
        self.root = url
        self.base = url.rstrip("/")
        if not urllib.parse.urlsplit(url).netloc:
            raise SourceError(f"data source {url!r} has no host; give a base URL such as "
                              f"https://host/corpora/mycorpus (manifest.json at BASE/manifest.json)")

    def location(self, name: str) -> str:
        return f"{self.base}/{urllib.parse.quote(name)}"

    @contextlib.contextmanager
    def open(self, name: str):
        url = self.location(_check_name(name))
        try:
            response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            error = TransientError if _transient(e) else SourceError
            raise error(f"cannot read {url}: {_why(e)}") from None
        with response:
            try:
                yield _Counted(response, url)
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, SourceError):
                    raise
                error = TransientError if _transient(e) else SourceError
                raise error(f"reading {url} failed: {_why(e)}") from None

    def read(self, name: str, consume):
        delay = RETRY_DELAY_S
        for attempt in range(HTTP_RETRIES + 1):
            try:
                with self.open(name) as stream:
                    return consume(stream)
            except TransientError as e:
                if attempt == HTTP_RETRIES:
                    raise SourceError(f"{e} (after {HTTP_RETRIES} retries)") from None
                time.sleep(delay)
                delay *= 2


class PipeSource(Source):
    def __init__(self, spec: str):
        self.root = spec
        self.template = spec[len("pipe:"):].strip()
        if "{file}" not in self.template:
            raise SourceError(f"data source {spec!r} has no {{file}} in its command; write e.g. "
                              f"'pipe:aws s3 cp s3://bucket/corpus/{{file}} -' (the command prints the file)")

    def location(self, name: str) -> str:
        return f"pipe:{self.template.replace('{file}', name)}"

    @contextlib.contextmanager
    def open(self, name: str):
        command = self.template.replace("{file}", _check_name(name))
        # stderr to a file, not a pipe: a chatty command cannot block on it while we read stdout.
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=err,
                                        stdin=subprocess.DEVNULL)
            except OSError as e:
                raise SourceError(f"pipe command `{command}` cannot start ({e.strerror})") from None
            try:
                yield proc.stdout
            except BaseException:
                # A command that failed (no such file, no credentials) ends the stream early: say
                # why it failed rather than what the short stream broke. One still writing is killed.
                try:
                    proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                else:
                    if proc.returncode != 0:
                        raise self._failed(command, proc.returncode, err) from None
                raise
            finally:
                proc.stdout.close()
            if proc.wait() != 0:
                raise self._failed(command, proc.returncode, err)

    @staticmethod
    def _failed(command: str, code: int, err) -> SourceError:
        err.seek(0)
        lines = [ln.strip() for ln in err.read()[-4096:].decode("utf-8", "replace").splitlines() if ln.strip()]
        said = f": {lines[-1]}" if lines else ""
        return SourceError(f"pipe command `{command}` exited with status {code}{said}")

