"""The server's sessions on disk: one SQLite database (WAL), one transaction per finished turn.

A session is its turns. Each turn row holds the messages the turn added to the session's
transcript (the request's new messages and the reply), and the session's state after it: the
conversation its context holds (ChatSession's messages, seen, carried) and the δ-mem memory as
float32 bytes. The session's current state is its last turn; an earlier turn's state is what a
request that edits the history rewinds to. A turn is committed whole or not at all, so a server
killed at any moment loses at most the turns in flight, and a restarted one continues every
session from the bytes it committed. Every query is parameterised.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id      TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns   INTEGER NOT NULL,
    tokens  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    turn       INTEGER NOT NULL,
    added      TEXT NOT NULL,
    live       TEXT NOT NULL,
    memory     BLOB,
    created    REAL NOT NULL,
    PRIMARY KEY (session_id, turn)
);
"""


@dataclass(frozen=True)
class TurnState:
    """A session's state after a turn (turn 0: a new session)."""
    turn: int
    messages: list[dict[str, Any]]   # the conversation the context holds
    seen: int
    carried: bool
    memory: bytes | None


@dataclass(frozen=True)
class SessionInfo:
    id: str
    created: float
    updated: float
    turns: int
    tokens: int


class SessionStore:
    """Sessions in the SQLite file at path, for one model and adapter (identity: a JSON-able dict
    that a later server must match, so that no memory is continued by another adapter)."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any]):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")   # a committed turn survives a power cut too
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._check_identity(identity)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"{self.path!r} is not a pydeltamem sessions database: {e}") from None
        except ValueError:
            self._db.close()
            raise

    def _check_identity(self, identity: dict[str, Any]) -> None:
        want = json.dumps(identity, sort_keys=True)
        with self._transaction() as db:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not rows:
                db.execute("INSERT INTO meta VALUES ('schema', ?), ('identity', ?)", (str(SCHEMA_VERSION), want))
                return
        if rows.get("schema") != str(SCHEMA_VERSION):
            raise ValueError(f"{self.path!r} has sessions schema {rows.get('schema')!r}, this server reads {SCHEMA_VERSION}")
        if rows.get("identity") != want:
            raise ValueError(f"{self.path!r} holds the sessions of another model or adapter ({rows.get('identity')}); "
                             "their memories cannot be continued by this one: use another --sessions file")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- reading ----
    def info(self, session_id: str) -> SessionInfo | None:
        with self._lock:
            row = self._db.execute("SELECT id, created, updated, turns, tokens FROM sessions WHERE id = ?",
                                   (session_id,)).fetchone()
        return None if row is None else SessionInfo(*row)

    def list(self, limit: int, after: str | None = None) -> list[SessionInfo]:
        """Sessions in id order, at most limit, starting after the id `after` (pagination)."""
        with self._lock:
            rows = self._db.execute("SELECT id, created, updated, turns, tokens FROM sessions WHERE id > ? "
                                    "ORDER BY id LIMIT ?", (after or "", limit)).fetchall()
        return [SessionInfo(*r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def transcript(self, session_id: str) -> tuple[list[dict[str, Any]], list[int]]:
        """Every message the session's turns added, and where each turn ended in that list
        (ends[t] for turn t; ends[0] = 0)."""
        with self._lock:
            rows = self._db.execute("SELECT added FROM turns WHERE session_id = ? ORDER BY turn",
                                    (session_id,)).fetchall()
        messages: list[dict[str, Any]] = []
        ends = [0]
        for (added,) in rows:
            messages.extend(json.loads(added))
            ends.append(len(messages))
        return messages, ends

    def state(self, session_id: str, turn: int) -> TurnState | None:
        """The state after turn (> 0) of the session; None when there is no such turn."""
        with self._lock:
            row = self._db.execute("SELECT live, memory FROM turns WHERE session_id = ? AND turn = ?",
                                   (session_id, turn)).fetchone()
        if row is None:
            return None
        live = json.loads(row[0])
        return TurnState(turn, live["messages"], live["seen"], live["carried"], row[1])

    def memory(self, session_id: str) -> bytes | None:
        """The memory after the session's last turn."""
        with self._lock:
            row = self._db.execute("SELECT memory FROM turns WHERE session_id = ? ORDER BY turn DESC LIMIT 1",
                                   (session_id,)).fetchone()
        return None if row is None else row[0]

    # ---- writing ----
    def commit_turn(self, session_id: str, after: int, added: list[dict[str, Any]], state: TurnState,
                    tokens: int) -> None:
        """Turn after+1 of the session: its added messages and the state after it. Turns past `after`
        (a branch the request's history left) go in the same transaction."""
        assert state.turn == after + 1
        now = time.time()
        live = json.dumps({"messages": state.messages, "seen": state.seen, "carried": state.carried})
        with self._transaction() as db:
            db.execute("INSERT INTO sessions (id, created, updated, turns, tokens) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET updated = excluded.updated, turns = excluded.turns, "
                       "tokens = excluded.tokens", (session_id, now, now, state.turn, tokens))
            db.execute("DELETE FROM turns WHERE session_id = ? AND turn > ?", (session_id, after))
            db.execute("INSERT INTO turns (session_id, turn, added, live, memory, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (session_id, state.turn, json.dumps(added), live, state.memory, now))

    def delete(self, session_id: str) -> bool:
        with self._transaction() as db:
            gone = db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
        return gone > 0
