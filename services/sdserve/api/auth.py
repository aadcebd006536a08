"""API keys and the tenants they belong to (`sdserve serve --api-key-file PATH`).

The key file holds one key per line, optionally followed by a tenant name (keys without one
belong to the tenant "default") and a role (`admin`: the key may also manage the server);
blank lines and lines starting with # are ignored:

    # key                                  tenant   role
    sk-3f1c2b0a9d8e7f6a5b4c3d2e1f0a9b8c    acme
    sk-0a1b2c3d4e5f60718293a4b5c6d7e8f9    acme     admin
    sk-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b    globex

Every DiffusionService call then carries gRPC metadata `authorization: Bearer KEY`; a job is
visible and cancellable only with a key of the tenant that submitted it. Keys are compared in
constant time, with every key of the file, and never logged. Without a key file the server is
open (tenant "").
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from sdserve.errors import PermissionDenied, Unauthenticated

DEFAULT_TENANT = "default"
ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class ApiKeys:
    """The keys of a key file, each with its tenant."""

    keys: tuple[tuple[bytes, str], ...]
    admin_keys: tuple[bytes, ...] = ()
    """The keys with the admin role."""

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Reads a key file. Raises ValueError naming the line of a malformed entry."""
        entries, admins = [], []
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 3:
                raise ValueError(
                    f"{path}:{number}: expected KEY [TENANT [ROLE]], got {len(fields)} fields"
                )
            if len(fields) == 3 and fields[2] != ADMIN_ROLE:
                raise ValueError(f"{path}:{number}: unknown role {fields[2]!r} (the one role "
                                 f"is {ADMIN_ROLE!r})")  # fmt: skip
            entries.append((fields[0].encode(), fields[1] if len(fields) >= 2 else DEFAULT_TENANT))
            if len(fields) == 3:
                admins.append(fields[0].encode())
        if not entries:
            raise ValueError(f"{path}: no API keys in the file")
        return cls(tuple(entries), tuple(admins))

    def tenant(self, metadata: dict[str, str]) -> str:
        """The tenant of the call's `authorization: Bearer KEY` metadata.

        Raises:
            Unauthenticated: no such metadata, or an unknown key (the message never holds it).
        """
        value = metadata.get("authorization", "")
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated(
                "this server needs an API key: send gRPC metadata 'authorization: Bearer KEY' "
                "(sdserve's CLI reads it from SDSERVE_API_KEY)"
            )
        offered = key.strip().encode()
        found = ""
        for known, tenant in self.keys:  # every key, so the time does not tell which matched
            if hmac.compare_digest(offered, known):
                found = tenant
        if not found:
            raise Unauthenticated("unknown API key")
        return found

    def admin(self, metadata: dict[str, str]) -> str:
        """The tenant of the call's key, which must have the admin role.

        Raises:
            Unauthenticated: no key, or an unknown one.
            PermissionDenied: a known key without the admin role.
        """
        tenant = self.tenant(metadata)
        offered = metadata.get("authorization", "").partition(" ")[2].strip().encode()
        admin = False
        for known in self.admin_keys:  # every admin key, so the time does not tell which
            admin |= hmac.compare_digest(offered, known)
        if not admin:
            raise PermissionDenied(f"this call needs an API key with the {ADMIN_ROLE!r} role "
                                   "in the server's key file")  # fmt: skip
        return tenant
