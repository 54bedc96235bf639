"""Where specs and input images may come from, so a spec cannot make a worker read or fetch
what its author should not reach.

- A deployment's `spec` parameter is a name in `pipelines/` or a path under a root of
  `IMAGEGEN_SPEC_ROOTS` (folders, `os.pathsep`-separated).
- A local `input_image` resolves (symlinks followed) inside the spec's folder or a root of
  `IMAGEGEN_INPUT_ROOTS`.
- An `s3://` input comes from the spec's archive bucket or one of `IMAGEGEN_INPUT_BUCKETS`
  (comma-separated).
- A URL input is http(s) without credentials in it, and its host is not loopback, link-local,
  private, multicast or reserved unless `IMAGEGEN_ALLOW_PRIVATE_HOSTS` names it (host names,
  addresses or networks such as `10.0.0.0/8`, comma-separated). IP literals in any notation are
  checked when the spec is validated; names are resolved and checked again at download, on every
  redirect.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

SPEC_ROOTS = "IMAGEGEN_SPEC_ROOTS"
INPUT_ROOTS = "IMAGEGEN_INPUT_ROOTS"
INPUT_BUCKETS = "IMAGEGEN_INPUT_BUCKETS"
ALLOW_PRIVATE_HOSTS = "IMAGEGEN_ALLOW_PRIVATE_HOSTS"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class InputRefused(ValueError):
    """An input image, URL or spec path outside what the configuration allows."""


def _paths(variable: str) -> list[Path]:
    return [Path(p).expanduser().resolve() for p in os.environ.get(variable, "").split(os.pathsep) if p.strip()]


def _words(variable: str) -> list[str]:
    return [w.strip() for w in os.environ.get(variable, "").split(",") if w.strip()]


def inside(path: Path, roots: list[Path]) -> bool:
    """`path`, symlinks resolved, is one of `roots` or below one."""
    resolved = path.resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def spec_roots(pipelines_dir: Path) -> list[Path]:
    return [pipelines_dir.resolve(), *_paths(SPEC_ROOTS)]


def check_local_input(path: Path, spec_dir: Path | None) -> None:
    roots = ([spec_dir.resolve()] if spec_dir is not None else []) + _paths(INPUT_ROOTS)
    if not inside(path, roots):
        target = path.resolve()
        link = f" (a link to {target})" if target != Path(os.path.normpath(path.absolute())) else ""
        raise InputRefused(f"input image {path}{link} is outside the spec's folder; move it there or add "
                           f"{target.parent} to {INPUT_ROOTS}")


def check_s3_input(uri: str, archive_bucket: str) -> None:
    bucket = urlsplit(uri).netloc
    allowed = [archive_bucket, *_words(INPUT_BUCKETS)]
    if bucket not in allowed:
        raise InputRefused(f"bucket {bucket!r} is not the archive bucket; inputs come from {', '.join(allowed)} "
                           f"(add buckets to {INPUT_BUCKETS})")


def _literal(host: str) -> Address | None:
    """The address a host string denotes without DNS (also `127.1`, `2130706433`, `0x7f.0.0.1`)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(info[0][4][0])


def _allowed(host: str, address: Address | None) -> bool:
    for entry in _words(ALLOW_PRIVATE_HOSTS):
        if entry.lower() == host.lower():
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _private(address: Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return (address.is_loopback or address.is_link_local or address.is_private or address.is_multicast
            or address.is_reserved or address.is_unspecified)


def check_url(url: str, *, resolve: bool) -> None:
    """Refuse a URL input that is not plain http(s) or that reaches a private address; with
    `resolve`, every address the host name resolves to is checked (at download time)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InputRefused(f"URL scheme {parts.scheme!r}: only http and https")
    if parts.username or parts.password:
        raise InputRefused("a URL with a user or password in it would put a secret in logs and manifests; "
                           "use a presigned URL or an s3:// input")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InputRefused("URL has no host")
    address = _literal(host)
    addresses = [address] if address is not None else []
    if address is None and (host.lower() == "localhost" or host.lower().endswith(".localhost")):
        addresses = [ipaddress.ip_address("127.0.0.1")]
    if not addresses and resolve:
        try:
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0])
                         for info in socket.getaddrinfo(host, parts.port or None, type=socket.SOCK_STREAM)]
        except (socket.gaierror, UnicodeError) as exc:
            raise InputRefused(f"cannot resolve {host}: {exc}") from None
    for found in addresses:
        if _private(found) and not _allowed(host, found):
            raise InputRefused(f"{host} is a loopback, private or link-local address ({found}); allow it in "
                               f"{ALLOW_PRIVATE_HOSTS} if this worker is meant to fetch from it")
