"""TLS contexts for DICOM (PS3.15 B.9): the one place that builds them, for the receiver's
TLS port, the sender's associations and the status check's C-ECHO.

The status check uses exactly the sender's client setup, so a green check proves what
sending needs.
"""

from __future__ import annotations

import ssl
from typing import Any

from node.config import Settings
from node.destinations import Destination


class TLSSetupError(Exception):
    """The node's certificate, key or CA file cannot be used; the message says why."""


class _HandshakeInAssociation(ssl.SSLContext):
    """A server context whose TLS handshake runs in the association's thread.

    pynetdicom wraps each accepted socket in its single accept loop; with Python's
    default handshake-on-connect, one caller that connects and stays silent would hold
    up every other TLS caller.  OpenSSL then handshakes on the first read instead.
    """

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(settings: Settings) -> ssl.SSLContext:
    """The receiver's context: the node's certificate; mutual TLS checks the callers' CA."""
    context = _HandshakeInAssociation(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    if settings.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
    if settings.tls_require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_args(
    settings: Settings, destination: Destination
) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``destination``: a verifying client context with the
    configured CA (or the system's) and the node's certificate if it has one; None without
    TLS.  Raises TLSSetupError when the files cannot be used.
    """
    if not destination.tls:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None,
        )
        if settings.tls_cert_file is not None:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"TLS setup failed: {exc}") from exc
    return context, destination.host
