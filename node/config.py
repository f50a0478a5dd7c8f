"""One validated settings object: a TOML file plus ``DENOISE_NODE_*`` environment variables.

Environment variables win over the file; nested keys use a double underscore
(``DENOISE_NODE_DESTINATIONS__PACS__HOST``).  Every default runs on a laptop.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node.destinations import AnyDestination, Destination

ENV_PREFIX = "DENOISE_NODE_"
#: The ONNX model that ships with the node: package data of ``node`` (found after
#: ``pip install`` and in the image), the default ``model_path``.  ``models/`` writes it.
SHIPPED_MODEL = Path(__file__).resolve().parent / "model" / "ct_denoise.onnx"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


#: Job priorities an administrator or a rule may set (the column is a 32-bit integer).
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000


class Rule(BaseModel):
    """Which series are denoised, how strongly and where the result goes.

    The first rule whose every given condition matches decides; with no rules the
    built-in default applies (CT, ORIGINAL, not LOCALIZER, at least ``min_slices``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    action: Literal["denoise", "skip"] = "denoise"
    calling_ae_titles: list[str] | None = None
    series_description: str | None = Field(None, description="regular expression, searched")
    convolution_kernel: str | None = Field(None, description="regular expression, searched")
    slice_thickness_min: float | None = None
    slice_thickness_max: float | None = None
    ctdi_vol_max: float | None = None
    min_slices: int | None = Field(None, ge=1)
    strength: float | None = Field(None, ge=0.0, le=1.0)
    destinations: list[str] | None = None
    #: jobs of this rule are taken before those of lower priority (default 0)
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)

    @field_validator("series_description", "convolution_kernel")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class WebUser(BaseModel):
    """A web account; ``password_hash`` comes from ``denoise-node web hash-password``.

    Roles: ``admin`` (look and act, may store), ``viewer`` (look only), ``store`` (a
    machine client that may only post instances by STOW-RS).  ``token_sha256`` is the
    hex SHA-256 of a bearer token the account may use instead of its password: only the
    digest is configured, so the TOML never holds the token itself.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    password_hash: str | None = Field(None, pattern=r"^(scrypt|pbkdf2_sha256)\$")
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    role: Literal["admin", "viewer", "store"] = "viewer"

    @model_validator(mode="after")
    def _credential(self) -> WebUser:
        if self.password_hash is None and self.token_sha256 is None:
            raise ValueError("a web user needs password_hash or token_sha256")
        return self


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "ct-denoise-node"


class Settings(BaseSettings):
    """Everything the node can be told; see README's Configuration section."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    ae_title: str = "DENOISE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    state_dir: Path = Field(default_factory=_default_state_dir)
    spool_dir: Path | None = None
    database_url: str | None = None
    settle_seconds: float = Field(10.0, ge=0.0)
    min_slices: int = Field(10, ge=1)
    strength: float = Field(1.0, ge=0.0, le=1.0)
    series_description_suffix: str = " [denoised]"
    series_number_offset: int = Field(1000, ge=0)
    destinations: dict[str, AnyDestination] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    model_path: Path | None = None
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    # Slices per inference call: 1 is fastest and leanest on a CPU (bench.inference, model
    # 2.2.0: 12.8 vs 12.6 slices/s and 294 vs 659 MiB at 4); a GPU wants more (compose uses 8).
    batch_size: int = Field(1, ge=1, le=256)
    # A series whose noise in flat soft tissue drops by less than this (0.2 = 20 %) gets a
    # warning event on its job; it is still sent.
    noise_warn_drop: float = Field(0.2, ge=0.0, le=1.0)
    # Resample each series to the model's noise grain (node.grain) where the model names
    # one; false runs every series as it is, as the node did before 2.3.0.
    match_noise_grain: bool = True
    max_attempts: int = Field(3, ge=1)
    retry_seconds: float = Field(30.0, gt=0.0)
    heartbeat_seconds: float = Field(5.0, gt=0.0)
    stale_after_seconds: float = Field(60.0, gt=0.0)
    poll_seconds: float = Field(1.0, gt=0.0)
    send_retry_seconds: float = Field(5.0, gt=0.0)
    send_retry_max_seconds: float = Field(300.0, gt=0.0)
    send_timeout_seconds: float = Field(20.0, gt=0.0)  # per network step; < stale_after / 2
    send_max_attempts: int = Field(
        3, ge=1
    )  # refusals (A-ASSOCIATE-RJ permanent, 0xCxxx) per destination
    send_give_up_hours: float = Field(72.0, gt=0.0)  # unreachable this long: the destination fails
    # each C-STORE association in a process of its own (node.store_processes); false: threads
    send_in_processes: bool = True
    tls_ca_file: Path | None = None  # trusted CAs for TLS destinations (default: system)
    tls_cert_file: Path | None = None  # the node's client certificate, if peers ask for one
    tls_key_file: Path | None = None
    tls_port: int | None = Field(None, ge=1, le=65535)  # DICOM over TLS (tls_cert/key_file)
    tls_require_client_cert: bool = False  # mutual TLS: callers need a cert from tls_ca_file
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)  # empty: any
    allowed_addresses: list[str] = Field(default_factory=list)  # CIDR networks; empty: any
    spool_min_free_mb: int = Field(200, ge=0)
    # Housekeeping (in the send role, else the receive role): README: Configuration.
    retention_days: float = Field(30.0, ge=0.0)  # spool files of jobs finished this long ago go
    spool_high_water_percent: float = Field(85.0, ge=0.0, le=100.0)  # fuller: oldest go early
    housekeeping_seconds: float = Field(300.0, gt=0.0)  # interval between runs
    orphan_grace_seconds: float = Field(86400.0)  # files no row names, this old, go
    # a copy kept after the job table failed to record it (the sender was told to resend)
    unrecorded_grace_seconds: float = Field(300.0, gt=0.0)
    # Listener limits: an attacker may not hold the slots (README: Configuration).
    max_pdu_size: int = Field(1048576, ge=4096, le=1 << 30)  # advertised and enforced
    max_instance_mb: int = Field(1024, ge=1, le=1 << 20)  # one data set, held in memory
    max_inflight_mb: int = Field(2048, ge=1, le=1 << 20)  # all arriving at once, per process
    max_associations: int = Field(64, ge=1)
    max_associations_per_address: int = Field(16, ge=1)
    receiver_processes: int = Field(1, ge=1, le=16)  # processes accepting on one port
    association_request_timeout_seconds: float = Field(10.0, gt=0.0)  # whole A-ASSOCIATE-RQ
    idle_timeout_seconds: float = Field(60.0, gt=0.0)  # no complete PDU for this long
    web_host: str = "127.0.0.1"
    web_port: int = Field(8080, ge=1, le=65535)
    web_users: list[WebUser] = Field(default_factory=list)  # login required off 127.0.0.1
    # Login throttling per (address, user) and per address (README: Dashboard).
    web_login_delay_seconds: float = Field(1.0, ge=0.0)  # after the first failure, doubling
    web_login_max_delay_seconds: float = Field(30.0, ge=0.0)
    web_login_lock_after: int = Field(10, ge=1)  # failures of a pair before its lock
    web_login_lock_seconds: float = Field(900.0, gt=0.0)
    web_login_address_lock_after: int = Field(50, ge=1)  # failures of an address, any users
    web_login_max_hashes: int = Field(2, ge=1)  # password hashes computed at once
    web_login_hash_wait_seconds: float = Field(2.0, ge=0.0)  # then 429
    web_session_seconds: float = Field(12 * 3600.0, gt=0.0)  # a login lasts this long
    # STOW-RS (POST /dicomweb/studies): a larger request body is refused with 413; the
    # body is spooled to disk part by part, never held in memory whole.
    stow_max_request_mb: int = Field(2048, ge=1)
    # More requests at once, or a spool below its watermark (checked before the body and
    # at each part as it streams), are answered 503 with this Retry-After.
    stow_max_concurrent_requests: int = Field(4, ge=1)
    stow_retry_after_seconds: float = Field(60.0, gt=0.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "text"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return Destination._ae_title(value)

    @field_validator("orphan_grace_seconds")
    @classmethod
    def _orphan_grace(cls, value: float) -> float:
        # A received file is in the spool a moment before its row is written (longer when
        # the job table's answer was lost): with no grace the sweep could remove it.
        if not value > 0.0:
            raise ValueError(
                "must be greater than 0: a spooled file waits this long for its row "
                "before the orphan sweep may remove it"
            )
        return value

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _allowed_ae_titles(cls, values: list[str]) -> list[str]:
        return [Destination._ae_title(value).strip() for value in values]

    @field_validator("allowed_addresses")
    @classmethod
    def _allowed_addresses(cls, values: list[str]) -> list[str]:
        """Normalised CIDR networks; a bare address is a /32 (or /128) network."""
        try:
            return [str(ipaddress.ip_network(value, strict=False)) for value in values]
        except ValueError as exc:
            raise ValueError(f"not an IP network: {exc}") from exc

    @model_validator(mode="after")
    def _tls_listener(self) -> Settings:
        """A TLS listener needs the node's certificate and key; mutual TLS needs the CA."""
        if self.tls_port is not None and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError("tls_port needs tls_cert_file and tls_key_file")
        if self.tls_require_client_cert and self.tls_ca_file is None:
            raise ValueError("tls_require_client_cert needs tls_ca_file (the callers' CA)")
        if self.tls_port is not None and self.tls_port == self.port:
            raise ValueError("tls_port must differ from port")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment variables override the TOML file (passed as init values)."""
        return env_settings, init_settings

    @property
    def spool(self) -> Path:
        return self.spool_dir or self.state_dir / "spool"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'node.db'}"

    @property
    def model_file(self) -> Path:
        return self.model_path or SHIPPED_MODEL

    def committing(self) -> dict[str, Destination]:
        """The DICOM destinations that ask for storage commitment (DICOMweb defines none)."""
        return {
            name: destination
            for name, destination in self.destinations.items()
            if isinstance(destination, Destination) and destination.storage_commitment
        }

    def check_references(self) -> None:
        """Rules may only name destinations that exist."""
        for index, rule in enumerate(self.rules):
            for name in rule.destinations or []:
                if name not in self.destinations:
                    raise ConfigError(
                        f"rules.{index}.destinations: unknown destination {name!r}; "
                        f"known: {sorted(self.destinations) or 'none'}"
                    )


def _key(loc: tuple[int | str, ...]) -> str:
    """The dotted key of an error; the tag pydantic adds for a destination's kind
    (``destinations.pacs.dicom.port``) is not part of the key a user wrote."""
    parts = [str(part) for part in loc]
    if parts[:1] == ["destinations"] and len(parts) > 2 and parts[2] in ("dicom", "dicomweb"):
        del parts[2]
    return ".".join(parts) or "(top level)"


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (``path`` or ``$DENOISE_NODE_CONFIG``) and the environment.

    Raises ConfigError with the dotted key and the reason, so a bad config fails at
    start with a message an administrator can act on.
    """
    path = path or os.environ.get(f"{ENV_PREFIX}CONFIG")
    values: dict[str, Any] = {}
    if path:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    values.update(overrides)
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{_key(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
    settings.check_references()
    return settings
