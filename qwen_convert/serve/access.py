"""Who may do what: the API key, the admin key, and the directories models may be loaded from.

- With an API key, every route but the public ones (`/health`, and `/`: a static page that holds no
  data and sends the key the operator types into it) needs `Authorization: Bearer KEY`; anything
  else, unknown routes included, is 401 before a body is read. Keys are compared in constant time
  (SHA-256 of both sides through hmac.compare_digest, so not even the length leaks).
- Model management (`/v1/models/load`, `/unload`) is off unless the operator names the directories
  models may be loaded from. A load path is resolved (symlinks, `..`) before it is checked, and the
  resolved path is what gets loaded, so a symlink swapped after the check changes nothing. A path
  outside those directories gets one refusal, whatever exists there.
- An admin key, when given, is the only key management routes accept; it works on every route.
- What a client is told never holds a host path it did not send: load failures name the path as the
  client sent it, any other absolute path becomes `<path>`, and the details go to the server's log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from qwen_convert.errors import QconvError

from .options import AccessOptions, ModelSpec
from .protocol import ApiError, Forbidden, InvalidModel, Unauthorized

log = logging.getLogger("qconv.serve")

PUBLIC_PATHS = frozenset({"/health", "/"})
MANAGEMENT_PATHS = frozenset({"/v1/models/load", "/v1/models/unload"})
KEY_ENV, ADMIN_KEY_ENV = "QCONV_API_KEY", "QCONV_ADMIN_KEY"
# RFC 6750's token68 alphabet, the characters a Bearer credential may hold.
KEY_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/=")
# An absolute path inside a message (not the second slash of a URL, not a/b inside a word).
_ABSOLUTE = re.compile(r"(?<![\w:/.~-])/[^\s'\"(),;:]+")


class AccessError(QconvError):
    """The access options are inconsistent or a key cannot be read (start-up: one line, exit 1)."""


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def key_matches(given: bytes | None, expected: bytes | None) -> bool:
    """Constant time in the content and the length of both: compares SHA-256 digests."""
    if given is None or expected is None:
        return False
    return _same(_digest(given), _digest(expected))


def _same(given_digest: bytes | None, expected_digest: bytes | None) -> bool:
    if given_digest is None or expected_digest is None:
        return False
    return hmac.compare_digest(given_digest, expected_digest)


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The credential of an `Authorization: Bearer ...` header (scheme case-insensitive), else None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credential = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                return credential.strip()
            return None
    return None


@dataclass(frozen=True)
class Access:
    """The resolved policy the app enforces (keys as bytes, directories resolved)."""

    api_key: bytes | None = None
    admin_key: bytes | None = None
    model_dirs: tuple[Path, ...] = ()
    public_metrics: bool = False
    # The keys' digests, computed once: a request hashes only the credential it sends.
    _api_digest: bytes | None = field(init=False, repr=False, compare=False, default=None)
    _admin_digest: bytes | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        for name, key in (("_api_digest", self.api_key), ("_admin_digest", self.admin_key)):
            object.__setattr__(self, name, _digest(key) if key is not None else None)

    def __repr__(self) -> str:  # never print a key
        return (f"Access(api_key={'set' if self.api_key else None}, admin_key={'set' if self.admin_key else None}, "
                f"model_dirs={len(self.model_dirs)}, public_metrics={self.public_metrics})")

    @property
    def management(self) -> bool:
        return bool(self.model_dirs)

    @property
    def keyed(self) -> bool:
        """Whether any route needs a key (without one, every request goes on: management answers 403 itself)."""
        return self._api_digest is not None or self._admin_digest is not None

    def check(self, path: str, credential: bytes | None) -> ApiError | None:
        """None if a request to PATH with CREDENTIAL may go on; else the error to answer."""
        if self._open(path):
            return None
        return self._decide(path, _digest(credential) if credential is not None else None)

    def check_request(self, path: str, headers: list[tuple[bytes, bytes]]) -> ApiError | None:
        """check() on an ASGI request's headers, read only where the route needs a key."""
        if self._open(path):
            return None
        credential = bearer(headers)
        return self._decide(path, _digest(credential) if credential is not None else None)

    def _open(self, path: str) -> bool:
        return not self.keyed or path in PUBLIC_PATHS or (path == "/metrics" and self.public_metrics)

    def _decide(self, path: str, given: bytes | None) -> ApiError | None:
        """GIVEN: the digest of the credential sent, or None."""
        if path in MANAGEMENT_PATHS and self._admin_digest is not None:
            if _same(given, self._admin_digest):
                return None
            if _same(given, self._api_digest):
                return Forbidden("this route needs the admin key", headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
            return _unauthorized(given)
        if self._api_digest is None or _same(given, self._api_digest) or _same(given, self._admin_digest):
            return None
        return _unauthorized(given)

    def require_management(self) -> None:
        if not self.management:
            raise management_off()

    def load_spec(self, requested: str, name: str | None, variant: str | None) -> ModelSpec:
        """What a load request may open: its path resolved and inside an allowed directory, or Forbidden.
        The served name defaults to the last part of the path as sent (a symlink's name, not its target's)."""
        path = self.load_path(requested)
        sent = Path(requested).name
        return ModelSpec(str(path), name or (sent if sent not in ("", ".", "..") else path.name), variant)

    def load_path(self, requested: str) -> Path:
        """The resolved directory a load request may open, or Forbidden (one message for every refusal)."""
        self.require_management()
        try:
            resolved = Path(os.path.realpath(requested))  # no ~ expansion: that is for the operator's paths
        except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
            raise outside() from None
        if not any(resolved == d or d in resolved.parents for d in self.model_dirs):
            log.warning("refused a model load outside the allowed directories: %r (resolved %r)", requested, str(resolved))
            raise outside()
        return resolved


@contextlib.contextmanager
def told_as(resolved: str, requested: str):
    """A load failure inside: logged in full, answered as InvalidModel naming the path as the client sent it."""
    try:
        yield
    except ApiError:
        raise
    except QconvError as exc:
        log.warning("model load from %r failed: %s", resolved, str(exc))
        raise InvalidModel(redact(str(exc), {resolved: requested.rstrip("/") or requested})) from None


def _unauthorized(credential: bytes | None) -> Unauthorized:
    if credential is None:
        return Unauthorized("this server needs an API key: send Authorization: Bearer KEY",
                            headers={"WWW-Authenticate": "Bearer"})
    return Unauthorized("invalid API key", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def management_off() -> Forbidden:
    return Forbidden("model management is off on this server",
                     "the operator enables /v1/models/load and /unload with --allow-model-dir DIR")


def outside() -> Forbidden:
    return Forbidden("this server does not load models from that path",
                     "models load only from the directories the operator allowed with --allow-model-dir")


def redact(message: str, shown: dict[str, str] | None = None) -> str:
    """MESSAGE for a client: each path in SHOWN replaced by what the client sent, other absolute paths by <path>."""
    for real, said in sorted((shown or {}).items(), key=lambda kv: -len(kv[0])):
        message = message.replace(real, said)
    kept = tuple(v for v in (shown or {}).values() if v.startswith("/"))

    def scrub(m: re.Match) -> str:
        text = m.group(0)
        return text if any(text == k or text.startswith(k.rstrip("/") + "/") for k in kept) else "<path>"

    return _ABSOLUTE.sub(scrub, message)


# --- start-up: options -> Access ------------------------------------------------------------------

def _read_key(value: str | None, file: Path | None, what: str, flag: str, env: str) -> bytes | None:
    if value is None and file is None and os.environ.get(env) == "":
        # click reads an empty variable as unset: an operator who meant to set a key would serve without one
        raise AccessError(f"{env} is set but empty", "set it to the key, or unset it to serve without one")
    if value is not None and file is not None:
        raise AccessError(f"the {what} is given twice ({flag} or {env}, and {flag}-file)", "give it once")
    if file is not None:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AccessError(f"cannot read the {what} from {file}: {exc.strerror if isinstance(exc, OSError) else 'not UTF-8'}",
                              f"{flag}-file names a file holding the key") from None
    if value is None:
        return None
    if not value:
        raise AccessError(f"the {what} is empty", f"set {env} or {flag}-file to a non-empty key, or leave both unset")
    bad = sorted(set(value) - KEY_CHARS)
    if bad:
        raise AccessError(f"the {what} holds a character a Bearer token cannot carry ({bad[0]!r})",
                          "use letters, digits and - . _ ~ + / = (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return value.encode("ascii")


def resolve_access(options: AccessOptions) -> Access:
    """Read the keys (value or file) and resolve the model directories; AccessError if they do not fit."""
    api_key = _read_key(options.api_key, options.api_key_file, "API key", "--api-key", KEY_ENV)
    admin_key = _read_key(options.admin_key, options.admin_key_file, "admin key", "--admin-key", ADMIN_KEY_ENV)
    dirs = []
    for d in options.model_dirs:
        resolved = Path(os.path.realpath(Path(d).expanduser()))
        if not resolved.is_dir():
            raise AccessError(f"--allow-model-dir {d} is not a directory", "name directories that exist")
        if resolved == Path(resolved.anchor):
            raise AccessError("--allow-model-dir / would let clients load from anywhere", "name the directory that holds the models")
        dirs.append(resolved)
    if admin_key is not None and not dirs:
        raise AccessError("an admin key guards model management, which is off", "enable it with --allow-model-dir DIR")
    if admin_key is not None and api_key is not None and key_matches(admin_key, api_key):
        raise AccessError("the admin key is the API key", "give them different values, or drop the admin key")
    return Access(api_key, admin_key, tuple(dict.fromkeys(dirs)), options.public_metrics)
