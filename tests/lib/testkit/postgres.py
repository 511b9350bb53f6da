"""The private PostgreSQL server that scripts/postgres.sh runs for a suite
(`make unit`, `make replicas`): databases on it, psql and pg_dump, and the
server stopped and started again for a drill.

Environment (set by `scripts/postgres.sh run -- ...`):
  APITOKENS_TEST_POSTGRES  postgres://apitokens@127.0.0.1:PORT/postgres (trust on loopback)
  APITOKENS_PG_DIR         the cluster's directory (its data, log and socket)
  APITOKENS_PG_BIN         the server's bin directory (psql, pg_dump)
  APITOKENS_PG_CTL         scripts/postgres.sh, for `stop` and `start`
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from testkit.timing import limit

VARIABLES = ("APITOKENS_TEST_POSTGRES", "APITOKENS_PG_DIR", "APITOKENS_PG_BIN", "APITOKENS_PG_CTL")


def missing() -> list[str]:
    return [v for v in VARIABLES if not os.environ.get(v)]


class Postgres:
    def __init__(self):
        self.base = os.environ["APITOKENS_TEST_POSTGRES"]
        self.dir = Path(os.environ["APITOKENS_PG_DIR"])
        self.bin = Path(os.environ["APITOKENS_PG_BIN"])
        self.ctl = os.environ["APITOKENS_PG_CTL"]
        parts = urlsplit(self.base)
        self.host, self.port, self.user = parts.hostname, parts.port, parts.username
        self.databases: list[str] = []

    def url(self, database: str, **params: str) -> str:
        """The database's URL; TLS off unless `params` say otherwise (the
        server may have TLS on, and the system's roots do not trust it)."""
        params = {"sslmode": "disable", **params}
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgres://{self.user}@{self.host}:{self.port}/{database}?{query}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            [str(self.bin / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.url(database), "-c", sql],
            capture_output=True, text=True, timeout=limit(60))
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def create_database(self, name: str) -> str:
        self.psql(f"CREATE DATABASE {name}")
        self.databases.append(name)
        return self.url(name)

    def dump(self, database: str) -> str:
        """Everything in the database (schema and rows), as pg_dump writes it."""
        out = subprocess.run([str(self.bin / "pg_dump"), "-d", self.url(database)],
                             capture_output=True, text=True, timeout=limit(60))
        assert out.returncode == 0, out.stderr
        return out.stdout

    def stop(self) -> None:
        """An immediate stop: every backend ends at once, as in a crash."""
        subprocess.run([self.ctl, "stop"], check=True, timeout=limit(60))

    def start(self) -> None:
        subprocess.run([self.ctl, "start"], check=True, timeout=limit(60))

    def server_user(self) -> int:
        return self.dir.stat().st_uid
