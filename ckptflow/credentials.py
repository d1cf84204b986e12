"""Credentials in storage_options: references wherever Prefect could see them, values only in
the process that opens the storage.

fsspec users write credentials into storage_options (docs/storage.md):

    storage_options: {key: AKIA..., secret: ..., client_kwargs: {endpoint_url: ...}}

Prefect stores flow parameters in its database and shows them in the UI, so a flow takes a
reference in place of each credential, resolved here, inside the task's process:

    {"key": {"env": "AWS_ACCESS_KEY_ID"}}     an environment variable of that process
    {"key": {"secret": "s3-key"}}             a Prefect Secret block (the tasks layer resolves it:
                                              this library never imports prefect)

`ckptflow run` moves literal credentials of its config into its own environment
(CKPTFLOW_CREDENTIAL_<PATH>) and hands the flow references (`stash`). A RunConfig or flow
parameter model serialized to JSON (what Prefect stores) shows a literal credential as
REDACTED; a redacted value that comes back (a retry that re-reads the stored parameters) is
refused with a line saying how to pass it.

A credential is a string (or a JSON object, e.g. gcsfs service-account info) under one of the
CREDENTIAL_KEYS, at any depth (client_kwargs.aws_secret_access_key).
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

from ckptflow.errors import CkptError

CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "access_key", "secret_key", "access_key_id",
    "secret_access_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "session_token",
    "sas_token", "account_key", "connection_string", "client_secret", "credential", "credentials",
    "api_key", "private_key", "refresh_token",
})
# gcsfs's `token` modes name a mechanism, not a secret.
NOT_SECRET = frozenset({"anon", "browser", "cache", "cloud", "google_default"})
REF_KINDS = ("env", "secret")
ENV_PREFIX = "CKPTFLOW_CREDENTIAL_"
REDACTED = "**redacted**"

_secret_loader: Callable[[str], str] | None = None


def set_secret_loader(load: Callable[[str], str] | None) -> None:
    """How `{"secret": NAME}` is read: the tasks layer registers Prefect's Secret.load."""
    global _secret_loader
    _secret_loader = load


def is_ref(value) -> bool:
    return (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in REF_KINDS
            and isinstance(next(iter(value.values())), str))


def is_credential_key(key) -> bool:
    return isinstance(key, str) and key.lower() in CREDENTIAL_KEYS


def _is_literal(key, value) -> bool:
    if not is_credential_key(key) or value is None or isinstance(value, bool) or is_ref(value):
        return False
    return not (isinstance(value, str) and (value == "" or value in NOT_SECRET))


def literals(options, path: str = "") -> list[str]:
    """Dotted paths of the literal credentials in `options`."""
    found = []
    for k, v in (options or {}).items() if isinstance(options, dict) else ():
        here = f"{path}.{k}" if path else str(k)
        if _is_literal(k, v):
            found.append(here)
        elif isinstance(v, dict) and not is_ref(v):
            found.extend(literals(v, here))
    return found


def _map(options, fn, path: str = ""):
    """`options` with fn(path, key, value) applied to every credential-key and reference value."""
    out = {}
    for k, v in options.items():
        here = f"{path}.{k}" if path else str(k)
        if is_ref(v) or _is_literal(k, v):
            out[k] = fn(here, k, v)
        elif isinstance(v, dict):
            out[k] = _map(v, fn, here)
        else:
            out[k] = v
    return out


def env_name(path: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]+", "_", path).upper().strip("_")


def stash(options: dict | None, environ: dict | None = None) -> dict:
    """`options` with each literal credential moved into `environ` (default os.environ) under
    CKPTFLOW_CREDENTIAL_<PATH> and replaced by {"env": that name}."""
    env = os.environ if environ is None else environ

    def move(path, key, value):
        if is_ref(value):
            return value
        name = env_name(path)
        env[name] = value if isinstance(value, str) else json.dumps(value)
        return {"env": name}

    return _map(options or {}, move)


def redacted(options: dict | None) -> dict:
    """`options` fit to show or store: references kept, literal credentials REDACTED."""
    return _map(options or {}, lambda path, key, value: value if is_ref(value) else REDACTED)


def resolve(options: dict | None, where: str = "storage_options") -> dict:
    """`options` with every reference replaced by its value (a CkptError names a missing one)."""
    def value(path, key, v):
        if v == REDACTED:
            raise CkptError(f"{where}.{path}: the credential was redacted (Prefect never stores one); "
                            'pass {"env": "VARIABLE"} or {"secret": "BLOCK"} instead')
        if not is_ref(v):
            return v
        kind, name = next(iter(v.items()))
        return _from_env(f"{where}.{path}", name) if kind == "env" else _from_secret(f"{where}.{path}", name)

    return _map(options or {}, value)


def _from_env(where: str, name: str):
    if name not in os.environ:
        raise CkptError(f"{where}: environment variable {name} is not set")
    raw = os.environ[name]
    if name.startswith(ENV_PREFIX) and raw[:1] == "{":
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _from_secret(where: str, name: str):
    if _secret_loader is None:
        raise CkptError(f"{where}: a Secret block ({name!r}) is read only inside a Prefect flow or task")
    try:
        return _secret_loader(name)
    except Exception as e:  # noqa: BLE001 - one line naming the block, never its value
        raise CkptError(f"{where}: Secret block {name!r} could not be read ({type(e).__name__})") from None
