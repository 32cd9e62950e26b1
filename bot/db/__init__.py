"""SQLite, the source of truth: the only package that writes SQL.

`Store` opens the file and runs transactions; each concern is a module of plain functions that
take the open transaction: `jobs` (the queue), `quotas` (the ledger), `moderation`, `members`,
`speeds`, and `admission`, which composes them into the one transaction that admits a job.
"""

from bot.db.connection import Store, Tx

__all__ = ["Store", "Tx"]
