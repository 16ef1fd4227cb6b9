"""What a search writes as it goes, through its RunDir: the journal of asks and tells since the last
checkpoint, the checkpoints, evals.jsonl, the strategy's statistics (strategy.jsonl) and worker events."""
from __future__ import annotations

import math
import sys
import time

from ..journal import pack_scores
from ..rundir import RunDir

STATS_LINES = 500  # strategy.jsonl: about this many lines over max_evals
STATS_EVERY_S = 10.0  # ... or one every this many seconds of search (no max_evals)


class Recorder:
    """The writer of one run's logs.

    `journal_no` numbers the checkpoint last written (and the journal opened with it); `replaying`
    is set while a resumed run replays its journal (nothing is journaled again, and only the records
    missing from evals.jsonl, those not in `logged`, are logged). The stats schedule: a line of
    strategy.jsonl every `stats_every` tells (about STATS_LINES over max_evals), or without max_evals one
    every STATS_EVERY_S seconds of search; `stats_told` is the tell count of the last line.
    """

    def __init__(self, rundir: RunDir, max_evals: int | None):
        self.rundir = rundir
        self.journal = None  # the open journal (RunDir.open_journal)
        self.journal_no = 0
        self.last_checkpoint = (0.0, 0)  # (perf_counter, tells) when the last checkpoint was written
        self.replaying = False
        self.logged: set[int] = set()
        self.stats_every = max(1, math.ceil(max_evals / STATS_LINES)) if max_evals is not None else None
        self.stats_mark = 0  # told // stats_every at the last line
        self.stats_next_t = 0.0
        self.stats_told = -1
        self.stats_failed = False

    # journal and checkpoints --------------------------------------------------------------------
    def resume(self, journal_no: int, logged: set[int]) -> list[tuple]:
        """A resumed run: the entries of the journal of checkpoint `journal_no`, to replay (replaying is
        set until `replayed`); `logged` the ids evals.jsonl already holds."""
        self.journal_no = journal_no
        self.logged = logged
        self.replaying = True
        return self.rundir.read_journal(journal_no)

    def replayed(self) -> None:
        self.replaying = False
        self.logged = set()

    def ask(self, n: int, first: int, fingerprints: list) -> None:
        if not self.replaying:
            self.journal.append(("ask", n, first, fingerprints))

    def tell(self, records: list[dict], jobs: list) -> None:
        """Journal a tell (before the strategy hears it: a driver killed in between replays it)."""
        if not self.replaying:
            self.journal.append(("tell", [(rec, pack_scores(j.scores)) for rec, j in zip(records, jobs)]))

    def evals(self, records: list[dict]) -> None:
        """Log the records evals.jsonl does not hold yet."""
        new = [rec for rec in records if rec["id"] not in self.logged]
        if new:
            self.rundir.log_evals(new)

    def checkpoint(self, strategy: dict, engine: dict, told: int) -> None:
        """A new checkpoint and its (empty) journal; the previous journal is removed."""
        old = self.journal
        self.journal_no += 1
        self.rundir.write_checkpoint({"version": 1, "journal_no": self.journal_no, "strategy": strategy,
                                      "engine": engine})
        self.journal = self.rundir.open_journal(self.journal_no)
        if old is not None:
            old.close()
            old.path.unlink(missing_ok=True)
        self.last_checkpoint = (time.perf_counter(), told)

    def checkpoint_due(self, told: int, every_s: float, every_evals: int | None) -> bool:
        t, n = self.last_checkpoint
        return time.perf_counter() - t >= every_s or bool(every_evals and told - n >= every_evals)

    # strategy statistics ----------------------------------------------------------------------------
    def start_stats(self, told: int, elapsed_before: float) -> None:
        """A session begins with `told` tells and `elapsed_before` seconds of search behind it."""
        self.stats_mark = told // self.stats_every if self.stats_every else 0
        self.stats_next_t = (math.floor(elapsed_before / STATS_EVERY_S) + 1) * STATS_EVERY_S
        self.stats_told = told  # nothing new to log yet

    def stats_due(self, told: int, now: float | None) -> bool:
        if self.replaying:
            return False
        if self.stats_every:
            return told // self.stats_every != self.stats_mark
        return now is not None and now >= self.stats_next_t

    def stats(self, told: int, t: float, strategy) -> None:
        """A line of strategy.jsonl: tells so far, search seconds, the strategy's statistics."""
        if self.stats_every:
            self.stats_mark = told // self.stats_every
        self.stats_next_t = (math.floor(t / STATS_EVERY_S) + 1) * STATS_EVERY_S
        if told == self.stats_told:
            return
        self.stats_told = told
        entry = {"evals": told, "t": round(t, 3)}
        try:
            stats = strategy.stats()
        except Exception as err:  # noqa: BLE001 - statistics are never worth ending a long run
            if not self.stats_failed:
                print(f"warning: strategy statistics failed ({type(err).__name__}: {err}); "
                      "strategy.jsonl logs only evals and t", file=sys.stderr)
            self.stats_failed, stats = True, {}
        for k, v in stats.items():
            v = float(v)
            if math.isfinite(v):
                entry[k] = v
        self.rundir.log_stats(entry)

    # workers ------------------------------------------------------------------------------------
    def event(self, event: str, t: float, **fields) -> None:
        """A line of workers.jsonl: started / replaced / given_up, at `t` seconds of search."""
        self.rundir.log_event({"event": event, **fields, "t": round(t, 3)})
