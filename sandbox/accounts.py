"""What each emulator module provides the launcher (its *sandbox hooks*), and a helper for them.

An emulator module, named by an `imagegen.emulators` entry point, defines:

- `DEFAULT_PORT`: the loopback port `imagegen sandbox up` uses unless told otherwise;
- `sandbox_account(state_dir) -> dict[str, str]`: a fresh sandbox account, secrets written to
  files beside it (`<field>_file`, mode 0600), plain fields inline;
- `make_app(account, latency) -> ASGI app`: the emulator serving that account;
- `block_fields(account) -> dict`: the provider Block's fields for the account (no endpoint).
- `bench_counts(stats) -> dict` (optional, for `make bench`): `requests`, `submits`, `polls` and
  `violations` (limit refusals) read from the emulator's `/_sandbox/stats`.

Emulators import none of the client's code: these hooks speak only of files and field names.
"""

from __future__ import annotations

import importlib
import secrets
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

GROUP = "imagegen.emulators"


def secret_file(state_dir: Path, name: str, value: str | bytes) -> str:
    """Write a sandbox secret only its owner may read; return the path."""
    path = Path(state_dir) / name
    path.write_bytes(value.encode() if isinstance(value, str) else value)
    path.chmod(0o600)
    return str(path)


def new_token() -> str:
    return secrets.token_hex(16)


def read_secret(account: dict[str, str], field: str) -> str:
    return Path(account[f"{field}_file"]).read_text().strip()


@lru_cache(maxsize=1)
def emulators() -> dict[str, str]:
    """Provider name -> emulator module, from the entry points (nothing imported)."""
    return dict(sorted((point.name, point.value) for point in entry_points(group=GROUP)))


def emulator(name: str) -> ModuleType:
    try:
        return importlib.import_module(emulators()[name])
    except KeyError:
        raise KeyError(f"no emulator for provider {name!r}; known: {', '.join(emulators())}") from None
