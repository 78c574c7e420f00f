"""``--config sources.toml``: many sources in one file, for ``sync`` and ``watch``.

The file names each source's URL and its options, spelled as the command's long options
(``checkpoint-every = 500``, ``changes = "orthanc"``, ``header = ["X-Site: a"]``, ``prune = true``);
a ``[defaults]`` table gives options every source takes unless it sets its own, and the command
line's own options win over both. A source's options become the command's arguments and go
through the same parser and checks as typed ones, so nothing in the file is read differently
from the command line, and an option the command does not know is an error naming the source.

Secrets are never in the file: ``password``, ``token``, ``fhir-password`` and ``fhir-token`` are
refused; ``password-env = "NAME"`` (and ``token-env``, ``fhir-password-env``, ``fhir-token-env``)
names the environment variable that holds one, read when the source runs; ``token-command``
names a command that prints a token. A header that carries credentials (``Authorization``,
``Cookie``, ...) is refused too.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECRETS = {"password", "token", "fhir-password", "fhir-token", "oauth-client-secret", "fhir-oauth-client-secret"}
FROM_ENVIRONMENT = {
    "password-env": ("password", "QIDO_CRAWLER_PASSWORD"),
    "token-env": ("token", "QIDO_CRAWLER_TOKEN"),
    "fhir-password-env": ("fhir_password", "QIDO_CRAWLER_FHIR_PASSWORD"),
    "fhir-token-env": ("fhir_token", "QIDO_CRAWLER_FHIR_TOKEN"),
}
"""``<key>-env`` in the file: (the setting it fills, the environment variable the command reads it from)."""
_CREDENTIAL_HEADERS = re.compile(r"\s*(authorization|proxy-authorization|cookie|x-api-key|api-key)\s*:", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOP_LEVEL = {"defaults", "sources"}


@dataclass
class Source:
    """One source of the file: its name, the command's arguments it stands for (URL last), and
    its secrets by setting (read from the environment variables the file names)."""

    name: str
    url: str
    argv: list[str]
    secrets: dict[str, str] = field(default_factory=dict)


def load(path: Path, options: Iterable[str], only: Iterable[str] = ()) -> list[Source]:
    """The sources of the file at ``path``, in the file's order (only those named in ``only``,
    if any). ``options``: the long options the command takes (``--out``, ...). ConfigError
    (exit 2) for a file that cannot be read, is not TOML, or says what the command cannot do."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the sources file {path}: {exc.strerror}", setting="config") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"the sources file {path} is not TOML: {exc}", setting="config") from None
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ConfigError(f"the sources file {path} has {', '.join(sorted(unknown))}: only [defaults] and [sources.NAME] tables",
                          setting="config")
    defaults = data.get("defaults", {})
    sources = data.get("sources")
    if not isinstance(defaults, dict):
        raise ConfigError(f"the sources file {path}: defaults must be a table", setting="config")
    if not isinstance(sources, dict) or not sources:
        raise ConfigError(f"the sources file {path} names no source (a [sources.NAME] table with a url)", setting="config")
    known = set(options)
    wanted = list(only)
    missing = [name for name in wanted if name not in sources]
    if missing:
        raise ConfigError(f"the sources file {path} has no source {', '.join(missing)} (it has {', '.join(sources)})", setting="only")
    result = []
    for name, table in sources.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"the sources file {path}: a source name is letters, digits, '.', '_' or '-', not {name!r}", setting="config")
        if not isinstance(table, dict):
            raise ConfigError(f"the sources file {path}: source {name} must be a table", setting="config")
        if wanted and name not in wanted:
            continue
        result.append(_source(path, name, {**defaults, **table}, known))
    return result


def _source(path: Path, name: str, table: dict[str, Any], known: set[str]) -> Source:
    where = f"the sources file {path}, source {name}"
    url = table.pop("url", None)
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{where}: no url", setting="config")
    argv: list[str] = []
    secrets: dict[str, str] = {}
    for key, value in table.items():
        option = key.replace("_", "-")
        if option in SECRETS:
            raise ConfigError(f"{where}: {key} is a secret and has no place in the file; name the environment variable "
                              f"that holds it with {option}-env", setting="config")
        if option in FROM_ENVIRONMENT:
            setting, _ = FROM_ENVIRONMENT[option]
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: {key} names an environment variable, not {type(value).__name__}", setting="config")
            if value not in os.environ:
                raise ConfigError(f"{where}: the environment variable {value} ({key}) is not set", setting="config")
            secrets[setting] = os.environ[value]
            continue
        if f"--{option}" not in known:
            raise ConfigError(f"{where}: {key} is not an option of this command", setting="config")
        if option == "header":
            for header in value if isinstance(value, list) else [value]:
                if isinstance(header, str) and _CREDENTIAL_HEADERS.match(header):
                    raise ConfigError(f"{where}: a header that carries credentials has no place in the file; use token-env, "
                                      "password-env or token-command", setting="config")
        argv.extend(_arguments(where, key, f"--{option}", value))
    return Source(name, url, [*argv, "--", url], secrets)


def _arguments(where: str, key: str, option: str, value: Any) -> list[str]:
    if value is True:
        return [option]
    if value is False:
        return []
    if isinstance(value, list):
        return [token for item in value for token in _arguments(where, key, option, item)]
    if isinstance(value, (str, int, float)):
        return [option, str(value)]
    raise ConfigError(f"{where}: {key} must be a string, number, true/false or a list of them, not {type(value).__name__}",
                      setting="config")
