"""A real Orthanc (the Debian package) as a throw-away PACS for tests and the demo.

It runs as its own process on free ports with its own storage folder and a generated
configuration, so the node talks to the same DICOM implementation a hospital would,
over real sockets.  The REST helpers use urllib only: nothing to install.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from devtools.tools import free_port

ORTHANC_AE = "ORTHANC"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PLUGINS = Path("/usr/share/orthanc/plugins")
#: Debian's orthanc-webviewer: a radiologist's view of a series in the browser.
WEB_VIEWER_PLUGIN = PLUGINS / "libOrthancWebViewer.so"
#: Debian's orthanc-dicomweb: STOW-RS, QIDO-RS and WADO-RS, as a server and as a client.
DICOMWEB_PLUGIN = PLUGINS / "libOrthancDicomWeb.so"
PLUGIN_PACKAGES = {WEB_VIEWER_PLUGIN: "orthanc-webviewer", DICOMWEB_PLUGIN: "orthanc-dicomweb"}


class OrthancError(Exception):
    """Orthanc could not be started or did not answer as expected."""


def find_orthanc() -> str:
    """The Orthanc binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise OrthancError("Orthanc is not installed: apt-get install orthanc")
    return found


class OrthancServer:
    """Start Orthanc on entry, stop it on exit; ``stop()``/``start()`` simulate an outage.

    The ports are chosen once, so a restarted Orthanc is the same PACS at the same
    address with the same stored instances.  ``node`` is the (AE title, host, port) of
    the node, listed in ``DicomModalities`` so that Orthanc could route series back.
    ``plugins`` are shared libraries Orthanc loads (``WEB_VIEWER_PLUGIN``,
    ``DICOMWEB_PLUGIN``: then ``dicomweb_url``).  ``extra_config`` is merged over the
    generated configuration (a plugin's own section, e.g. ``DicomWeb``).  ``users``
    (name → password) turns on Orthanc's HTTP Basic authentication, and the REST helpers
    log in as the first of them.
    """

    def __init__(
        self,
        folder: Path | None = None,
        node: tuple[str, str, int] = ("DENOISE", "127.0.0.1", 11112),
        dicom_port: int | None = None,
        http_port: int | None = None,
        plugins: Sequence[Path] = (),
        extra_config: dict[str, Any] | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self._own_folder = folder is None
        self.users = users or {}
        self.folder = Path(folder or tempfile.mkdtemp(prefix="orthanc-"))
        self.node = node
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.host = "127.0.0.1"
        self.ae_title = ORTHANC_AE
        self.plugins = tuple(plugins)
        self.extra_config = extra_config or {}
        self._process: subprocess.Popen[bytes] | None = None

    # -- process -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def explorer_url(self) -> str:
        return f"{self.url}/app/explorer.html"

    def web_viewer_url(self, series_id: str) -> str:
        """The Orthanc Web Viewer's page of one series (its Orthanc id, not its UID)."""
        return f"{self.url}/web-viewer/app/viewer.html?series={series_id}"

    @property
    def log_file(self) -> Path:
        return self.folder / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The generated Orthanc configuration (written to ``orthanc.json``)."""
        ae_title, host, port = self.node
        return {
            "Name": "ct-denoise-node test PACS",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "OverwriteInstances": False,
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "Plugins": self._plugins(),
            "DicomModalities": {"denoise": [ae_title, host, port]},
            **self.extra_config,
        }

    def _plugins(self) -> list[str]:
        for plugin in self.plugins:
            if not plugin.is_file():
                package = PLUGIN_PACKAGES.get(plugin, "the package that holds it")
                raise OrthancError(f"{plugin} is missing: apt-get install {package}")
        return [str(plugin) for plugin in self.plugins]

    def start(self) -> None:
        """Start the process and wait until its REST API answers."""
        if self.running:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        config_file = self.folder / "orthanc.json"
        config_file.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        # DCMTK (inside Orthanc) reads TCP_NODELAY; without it small PDUs wait for Nagle.
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(
                [find_orthanc(), str(config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.folder,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self._process.returncode}: {self._log_tail()}"
                )
            try:
                self.get("/system")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(
            f"Orthanc did not answer within {START_TIMEOUT:.0f} s: {self._log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the process (kill it if it does not exit in time)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- REST ----------------------------------------------------------------------------

    def _request(self, path: str, body: Any = None, method: str | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for user, password in list(self.users.items())[:1]:
            login = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {login}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request(path))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self._request(path, body))

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        """Orthanc's expanded records of the instances of one series (empty if none)."""
        query = {"SeriesInstanceUID": series_uid}
        return self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": True})

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """Orthanc's expanded records of the series of one study."""
        query = {"StudyInstanceUID": study_uid}
        return self.post("/tools/find", {"Level": "Series", "Query": query, "Expand": True})

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance, as Orthanc received it."""
        return self._request(f"/instances/{orthanc_id}/file")

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
