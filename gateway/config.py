"""The daemon's configuration: one TOML file, validated by pydantic, overridable from the
environment (``TIERGATE_SECTION__KEY``, e.g. ``TIERGATE_SERVER__HTTP=0.0.0.0:9000``).

A bad file never half-loads: ``load_config`` raises ``ConfigError`` naming the TOML line
and key at fault, and the caller keeps what it had (or exits 2 at start).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from policies.registry import PolicyError, policy_class
from providers.config import TierConfig
from providers.registry import KINDS, tier_configs
from tracking import BudgetsConfig, KeyConfig, RedisConfig


class ConfigError(Exception):
    """The config cannot be used. ``where`` names the TOML line and key when known."""

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message
        self.where = where


def parse_listen(value: str) -> tuple[str, int]:
    """"host:port" (IPv6 as "[::1]:8080") → (host, port)."""
    m = re.fullmatch(r"\[(?P<h6>[^\]]+)\]:(?P<p6>\d+)|(?P<h>[^:\[\]]*):(?P<p>\d+)", value)
    if not m:
        raise ValueError(f"listen address {value!r} is not host:port")
    host = m.group("h6") or m.group("h") or "127.0.0.1"
    port = int(m.group("p6") or m.group("p"))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "host:port", or "" to turn TCP off.
    http: str = "127.0.0.1:8080"
    # A path, or "" to turn the Unix socket off.
    unix_socket: str = ""
    unix_socket_mode: str = "0660"
    # Trust the socket's filesystem permissions: no API key needed on the Unix socket.
    trust_unix_socket: bool = True
    # With no [[keys]], serving a non-loopback address is refused unless this is set.
    allow_unauthenticated: bool = False
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(300.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    # Where the usage journal and other state live; systemd's $STATE_DIRECTORY wins.
    state_dir: str = "./state"
    # Log one line per request.
    access_log: bool = True

    @field_validator("http")
    @classmethod
    def _check_http(cls, v: str) -> str:
        if v:
            parse_listen(v)
        return v

    @field_validator("unix_socket_mode")
    @classmethod
    def _check_mode(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f"unix_socket_mode {v!r} is not an octal mode like \"0660\"")
        return v

    @property
    def socket_mode(self) -> int:
        return int(self.unix_socket_mode, 8)

    @property
    def listen(self) -> tuple[str, int] | None:
        return parse_listen(self.http) if self.http else None


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A name in policies.registry.POLICIES, or "package.module:Class".
    policy: str = "file_order"
    # Retries of one tier after its first try, for retryable errors.
    retries: int = Field(1, ge=0, le=10)
    backoff_initial_s: float = Field(0.1, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    backoff_multiplier: float = Field(2.0, ge=1)
    # A Retry-After longer than this is not waited for: the router fails over instead.
    max_retry_after_s: float = Field(5.0, ge=0)
    first_token_timeout_s: float = Field(30.0, gt=0)
    inter_token_timeout_s: float = Field(15.0, gt=0)
    # After the first byte reached the client: "error" ends the stream with an error
    # event; "resume" continues on the next tier able to continue the text.
    stream_failover: Literal["error", "resume"] = "error"
    # Circuit breaker: open after this many consecutive failures, half-open after reset.
    circuit_failures: int = Field(5, ge=1)
    circuit_reset_s: float = Field(30.0, gt=0)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        try:
            policy_class(v)
        except PolicyError as exc:
            raise ValueError(str(exc)) from exc
        return v


class LoggingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: console on a TTY, JSON lines otherwise (systemd's journal).
    format: Literal["auto", "json", "console"] = "auto"


class Config(BaseSettings):
    """The whole daemon config. Environment variables override the file."""

    model_config = SettingsConfigDict(
        env_prefix="TIERGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    keys: tuple[KeyConfig, ...] = ()
    # Each entry is validated as its kind's own model (``providers.registry``).
    tiers: tuple[TierConfig, ...] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the file (passed as init kwargs).
        return (env_settings, init_settings)

    @field_validator("tiers", mode="before")
    @classmethod
    def _tiers_by_kind(cls, v: Any) -> Any:
        return tier_configs().validate_python(v)

    @model_validator(mode="after")
    def _check(self) -> Config:
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique; repeated: {', '.join(dupes)}")
        key_names = [k.name for k in self.keys]
        dupes = sorted({n for n in key_names if key_names.count(n) > 1})
        if dupes:
            raise ValueError(f"key names must be unique; repeated: {', '.join(dupes)}")
        for tier_name in self.budgets.tiers:
            if tier_name not in names:
                raise ValueError(f"budgets.tiers.{tier_name}: no tier has that name")
        for key in self.keys:
            for t in key.tiers or ():
                if t not in names:
                    raise ValueError(f"key {key.name!r} allows tier {t!r}, which does not exist")
        priced = [t.name for t in self.tiers if not t.price.is_free]
        if priced and self.redis.hold_ttl_s < self.server.request_timeout_s:
            raise ValueError(
                f"redis.hold_ttl_s ({self.redis.hold_ttl_s}) must be at least "
                f"server.request_timeout_s ({self.server.request_timeout_s}): a budget hold "
                f"must outlive the longest call of a priced tier ({', '.join(priced)})"
            )
        if not self.server.http and not self.server.unix_socket:
            raise ValueError("server: both http and unix_socket are off; nothing would listen")
        return self

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def chat_tiers(self) -> tuple[TierConfig, ...]:
        return tuple(t for t in self.tiers if t.enabled and t.task == "chat")

    @property
    def embedding_tiers(self) -> tuple[TierConfig, ...]:
        return tuple(t for t in self.tiers if t.enabled and t.task == "embeddings")


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a TOML config; raise ConfigError with line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", where=str(path)) from exc
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=source) from exc
    try:
        return Config(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _without_kind_tag(tuple(first.get("loc", ())))
        dotted = _dotted(loc)
        line = locate(text, loc)
        where = f"{source}:{line}" if line else source
        if dotted:
            where = f"{where} [{dotted}]"
        more = len(exc.errors()) - 1
        msg = first.get("msg", "invalid value")
        if more:
            msg = f"{msg} (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(msg, where=where) from exc


def _without_kind_tag(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic names the union member in a tier's error location (``tiers.1.openai.x``);
    the file has no such key."""
    if loc[:1] == ("tiers",) and len(loc) > 2 and isinstance(loc[1], int) and loc[2] in KINDS:
        return loc[:2] + loc[3:]
    return loc


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"-]+)\s*\]\]?")


def locate(text: str, loc: Sequence[Any]) -> int | None:
    """Best-effort: the 1-based line in ``text`` where the value at ``loc`` is written."""
    lines = text.splitlines()
    parts = [p for p in loc if isinstance(p, (str, int))]
    if not parts:
        return None
    section, rest = parts[0], list(parts[1:])
    start, end = 0, len(lines)
    if isinstance(section, str):
        if rest and isinstance(rest[0], int):  # [[section]] array of tables
            index = rest.pop(0)
            seen = -1
            for i, line in enumerate(lines):
                m = _HEADER.match(line)
                if m and m.group(1) == "[[" and m.group(2) == section:
                    seen += 1
                    if seen == index:
                        start = i
                        break
            else:
                return None
        else:
            for i, line in enumerate(lines):
                m = _HEADER.match(line)
                if m and m.group(1) == "[" and m.group(2) == section:
                    start = i
                    break
            else:
                # A top-level key, or a section never written.
                for i, line in enumerate(lines):
                    if re.match(rf"^\s*{re.escape(section)}\s*=", line):
                        return i + 1
                return None
        for j in range(start + 1, len(lines)):
            m = _HEADER.match(lines[j])
            if m and not m.group(2).startswith(f"{section}."):
                end = j
                break
    keys = [p for p in rest if isinstance(p, str)]
    for key in keys:
        for i in range(start + 1, end):
            if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", lines[i]):
                return i + 1
    return start + 1
