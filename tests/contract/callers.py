"""Who calls the API in this suite, and the store it calls: the constants the
fixtures (conftest.py) and the tests share."""

from __future__ import annotations

import secrets
import zlib

from testkit.harness import remember_secret

# Seeded by `apitokens import` (seed-0000 ... in `default`; exactly QUOTA in
# `full`, so a create there is a 429; 100 more in ns-0 ... ns-9).
SEEDED_DEFAULT = 1000
QUOTA = 1900
SEEDED_TOTAL = 3000

# The callers' own tokens in `default`: the generated calls never delete,
# regenerate or disable them (test_2 steers them away).
OWN_TOKENS = {
    "admin",  # the bootstrap owner
    "contract-viewer-x7",
    "contract-editor-x7",
    "contract-rotated-x7",  # an owner regenerated with an overlap: its previous secret
    "contract-short-x7",  # an owner that expires in an hour
    "contract-expired-x7",  # an owner imported with an expiry in 2021
}

# Every caller of the generated calls, in the order each call is made: those
# that cannot change anything first, the long-lived owner last.
ORDER = ["no token", "mistyped secret", "unknown secret", "expired owner", "viewer", "editor",
         "other-namespace owner", "previous secret", "short-lived owner", "owner"]

class Credentials:
    """Caller name -> secret. Its repr names the callers only: pytest and
    Hypothesis print a failed test's arguments."""

    def __init__(self, secrets: dict[str, str]):
        self._secrets = dict(secrets)

    def __getitem__(self, who: str) -> str:
        return self._secrets[who]

    def __setitem__(self, who: str, secret: str) -> None:
        self._secrets[who] = secret

    def get(self, who, default=None):
        return self._secrets.get(who, default)

    def __contains__(self, who) -> bool:
        return who in self._secrets

    def __repr__(self) -> str:
        return f"<credentials of {', '.join(self._secrets)}>"

    def _repr_pretty_(self, p, cycle) -> None:  # Hypothesis's printer
        p.text(repr(self))


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def apt_secret(checksum_ok: bool = True) -> str:
    """A secret of the control plane's format (docs/api.md, "Secrets"): `apt_`, 32
    random base62 characters, the CRC-32 of those 36 as 6 base62 digits;
    with `checksum_ok=False` a mistyped one. Remembered (testkit.harness.SECRETS)."""
    body = "apt_" + "".join(secrets.choice(BASE62) for _ in range(32))
    n = zlib.crc32(body.encode())
    if not checksum_ok:
        n = (n + 1) % 2**32
    digits = ""
    for _ in range(6):
        digits = BASE62[n % 62] + digits
        n //= 62
    return remember_secret(body + digits)
