"""Where derived series go: a DICOM peer (C-STORE) or a DICOMweb archive (STOW-RS).

The destinations table of the settings (``node.config``), validated here so that a bad
address, AE title, port or credential name is refused when the node starts, not at the
first send.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
#: The placeholders a destination's ``viewer_url`` may use.
VIEWER_URL_FIELDS = frozenset({"study_uid", "series_uid"})
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ViewedDestination(BaseModel):
    """What every kind of destination has: where its viewer shows a series."""

    model_config = ConfigDict(extra="forbid")

    #: where its viewer shows a series, e.g. "https://pacs/viewer?study={study_uid}"; the
    #: job page links the derived series there once this destination has acknowledged it
    viewer_url: str | None = None

    @field_validator("viewer_url")
    @classmethod
    def _viewer_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("https://", "http://")):
            raise ValueError("a viewer URL starts with https:// or http://")
        fields = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        if not fields <= VIEWER_URL_FIELDS:
            raise ValueError(f"a viewer URL may only use {{study_uid}} and {{series_uid}}: {value}")
        return value

    def viewer_link(self, study_uid: str, series_uid: str) -> str | None:
        """This destination's viewer address of one series (None: no viewer configured)."""
        if self.viewer_url is None:
            return None
        return self.viewer_url.format(
            study_uid=quote(study_uid, safe=""), series_uid=quote(series_uid, safe="")
        )


class Destination(ViewedDestination):
    """A DICOM peer the derived series is sent to, referred to by its table name."""

    kind: Literal["dicom"] = "dicom"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    #: ask for storage commitment after the last instance; the delivery is final (and
    #: retention may remove the files) only once the destination reports it committed
    storage_commitment: bool = False
    #: no report this long after the first request: the destination fails
    commitment_timeout_seconds: float = Field(3600.0, gt=0.0)
    #: the request is sent again this often until the report comes or the timeout passes
    commitment_retry_seconds: float = Field(300.0, gt=0.0)
    #: associations opened at once for one series (``node.c_store_client``): the instances
    #: go over as many as the peer accepts, at least one
    associations: int = Field(4, ge=1, le=16)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not AE_TITLE.match(value) or not value.strip():
            raise ValueError("an AE title is 1-16 printable ASCII characters without backslash")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_dicomweb_keys(cls, values: Any) -> Any:
        return _refuse_keys(values, DicomWebDestination, "dicomweb")


class DicomWebDestination(ViewedDestination):
    """A DICOMweb archive the derived series is posted to by STOW-RS (``kind = "dicomweb"``).

    Credentials are never in the configuration: it names the environment variables
    that hold them, read when sending, so the TOML file can be shared and logged.
    """

    kind: Literal["dicomweb"]
    #: the service's base URL, e.g. https://pacs.example/dicom-web (STOW-RS posts to url/studies)
    url: str
    token_env: str | None = None  # bearer token
    username_env: str | None = None  # HTTP Basic, with password_env
    password_env: str | None = None
    tls_ca_file: Path | None = None  # CAs trusted for this server (default: the system's)
    # Instances per STOW-RS request, and bytes (a larger instance goes alone); see README.
    batch_instances: int = Field(16, ge=1, le=1000)
    batch_bytes: int = Field(16 * 1024 * 1024, ge=1024)

    @model_validator(mode="before")
    @classmethod
    def _no_dicom_keys(cls, values: Any) -> Any:
        return _refuse_keys(values, Destination, "dicom")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// address with a host")
        if parts.username or parts.password:
            raise ValueError(
                "url must not hold credentials: name their variables in username_env/password_env"
            )
        if parts.query or parts.fragment:
            raise ValueError("url is the service's base address, without query or fragment")
        try:  # urlsplit checks the port only when asked: ask now, not at the first send
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("the url's port must be a number 1 to 65535")
        return value.rstrip("/")

    @field_validator("token_env", "username_env", "password_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.match(value):
            raise ValueError(
                "the name of an environment variable (letters, digits, underscore), "
                "not the secret itself"
            )
        return value

    @model_validator(mode="after")
    def _one_auth(self) -> DicomWebDestination:
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("HTTP Basic needs both username_env and password_env")
        if self.token_env is not None and self.username_env is not None:
            raise ValueError("choose one authentication: token_env or username_env/password_env")
        return self


def _refuse_keys(values: Any, other: type[BaseModel], kind: str) -> Any:
    """A key of the other kind of destination gets a message that names the kind."""
    if isinstance(values, dict):
        shared = {"kind", *ViewedDestination.model_fields}
        foreign = sorted(set(values) & (set(other.model_fields) - shared))
        if foreign:
            raise ValueError(f'{", ".join(foreign)}: only for kind = "{kind}" destinations')
    return values


def _destination_kind(value: Any) -> str:
    kind = value.get("kind", "dicom") if isinstance(value, dict) else value.kind
    return str(kind)


#: Either kind of destination, told apart by ``kind`` (default ``"dicom"``).
AnyDestination = Annotated[
    Annotated[Destination, Tag("dicom")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]
