"""The targets of issue 12 judged from a run's figures, and the Markdown report with its chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import create, listing, pipeline, placement, update, watch

# What the profiles of the processes under test showed for each target (py-spy, `python -m bench
# --profile DIR`); written by whoever profiled, kept with the code the numbers come from.
FINDINGS: dict[str, str] = {
    "create": (
        "The API process is the limit: SQLite through aiosqlite's worker thread, then SQLAlchemy's ORM unit "
        "of work, validation and `row_to_proto`. Done since the first report: the create-time check of "
        "`helm_repo_url` resolved the chart host on every request through getaddrinfo's small, uncancellable "
        "thread pool, so with slow or absent DNS every create queued behind the last lookup (19/s at c=32, "
        "p50 2 s); `netguard.CachingResolver` keeps answers 60 s and failures 30 s and asks once per name. "
        "This process's SQLite writers queue on an asyncio lock instead of sleeping in SQLite's busy handler, "
        "and the outbox relay publishes all unsent rows at once and deletes them in one statement once stored. "
        "Group commit (`DeploymentStore.create`): the creates that arrive while one group is written wait and "
        "are written together in the next transaction, with one Core executemany `INSERT` per table "
        "(deployments, events, releases, outbox) and one look for their request_ids, names and quota use, "
        "instead of a transaction and an ORM flush each. Measured side by side on the loaded 2-core "
        "machine, before -> after: SQLite c=32 92 -> 305/s (0.067 -> 0.27x echo), c=128 107 -> 261/s; "
        "PostgreSQL c=32 69 -> 179/s (0.041 -> 0.089x), c=128 115 -> 219/s; c=1 unchanged (a group of one). "
        "Still open: the per-request work around the store (validation, `row_to_proto` twice, the gRPC "
        "handler) and one group in flight per process. "
        "Since then: a create at c=1 is mostly waiting, not CPU: on SQLite each statement is three hops to "
        "aiosqlite's worker thread and back (cursor, execute, fetch or close), 21 per create; a lone create "
        "without request_id or quota now writes its four inserts without `BEGIN IMMEDIATE` and the name "
        "look-up (the unique index refuses a taken name; it is then written alone, which names the holder): "
        "14 hops. A group's name and request_id look-ups were a `(user_id, x) IN (pairs)` list, which SQLite "
        "answers by reading the whole table for two pairs or more; they search the unique index per user "
        "now. The answer is the Deployment the change announced (`row_to_proto` twice per create, not three "
        "times), and the relay is woken after the callers are answered. Reading the custom values YAML in "
        "pure Python is half of validation (~120 of ~260 us) and was left as it was then (see the end): "
        "remembering verdicts would only flatter this benchmark, which sends one document. "
        "The bench (two alternating pairs, machine at load 10-13, "
        "with the remembered verdicts since dropped): "
        "SQLite c=1 84/47 -> 89/90 per s (p50 8.3/19.4 -> 9.4/8.5 ms), c=32 133/193 -> 341/347, c=128 "
        "241/231 -> 343/383; PostgreSQL c=1 33/23 -> 45/74, c=32 140/116 -> 126/159, c=128 209/325 -> "
        "196/235. What holds c=1 back is outside the create: the outbox relay runs after every commit (a "
        "read of the outbox, the publish, and a `DELETE` transaction that takes SQLite's writer lock the next "
        "create then waits for); in-process, a relay doing only those two statements raised the c=1 p50 from "
        "4-9 ms to 13-18 ms. At c=32 the API's own samples are mostly gRPC's handler and the event loop. "
        "The full run of 3d91fc3 went on a slower hour of this machine (the echo at c=1 806/s where the run "
        "before had 1,456/s, placement's cpu-time p99 2.7x): right after it, SQLite only, base ec1a95d and "
        "3d91fc3 alternating, two pairs: c=1 78 and 83/s -> 96 and 111/s (p50 11.8 and 11.3 -> 9.9 and 8.5 ms), "
        "c=32 309 and 315/s -> 333 and 369/s (0.072 and 0.079x -> 0.082 and 0.077x the echo). A relay that "
        "deletes in batches and skips what it sent was tried and not kept: no gain beyond the noise at "
        "c=1, and PostgreSQL at c=32 lower in two of three pairs. Since then each SQLite statement is one "
        "trip to aiosqlite's thread instead of three or four (`apphosting/sqlite_driver.py`: the cursor is "
        "made, run, read and closed there in one call), 5 trips for four statements and a rollback where "
        "the stock adapter made 14: SQLite c=1 157 and 153 -> 175 and 163/s (p50 5.93 and 6.06 -> 5.41 and "
        "5.73 ms), c=32 474 and 474 -> 501 and 502/s (two alternating pairs, load 1.9-3.2). Then the custom "
        "values YAML, still 43 % of validation's samples (py-spy), is composed by libyaml and its bounds "
        "checked in one walk of the composed nodes (`apphosting/yamlbounds.py`): 95 -> 15 us for the bench's "
        "document, 39 -> 7 ms for one of 200 keys, 1.3 s -> 0.39 s at the 256 KiB limit, all on the event loop. "
        "libyaml reads a few documents PyYAML's own scanner refused (a tab after a colon), as go-yaml, Helm's "
        "reader and a port of libyaml, does. Validation of the bench's request is now about 110 us. Two "
        "alternating pairs against 82b870a (load 2-2.8): SQLite c=32 476 and 568 -> 640 and 643/s, "
        "PostgreSQL 464 and 547 -> 562 and 604/s. What the API does per Create beyond that is spread thin "
        "(cProfile): SQLAlchemy's instrumented attributes on the four ORM rows a create builds (about 50 sets "
        "and 190 reads each), the rows' JSON, five uuid4s (a getrandom each), the placement request's message. "
        "Since then, from the API's CPU time per Create (all its threads, /proc, two runs each on a quiet "
        "machine), which repeats within a few per cent where rates do not: the group's inserts (and those of "
        "event batches and operation groups) are compiled once per set of columns and run as the driver's "
        "executemany, their parameters encoded by the columns' own bind processors, instead of a session "
        "execute of `insert(table)` each time: SQLite c=1 4.7-4.9 -> 4.4-4.5 ms, PostgreSQL c=1 4.1 -> 3.8 "
        "ms and c=32 1.80-1.86 -> 1.74-1.76 ms. A create's rows are then made without the mapped "
        "constructors (as an applied change's rows are): c=32 on SQLite 1.74 -> 1.64-1.66 ms. At c=1 the "
        "API spends about as much CPU per Create as the Create takes (4.4 ms, against 1.65 ms at c=32): "
        "what a lone create pays alone is the group's transaction, the relay's cycle (read, publish, "
        "delete) and the event loop's turns around each; also each SQLAlchemy await starts a greenlet, "
        "which on Python 3.11 maps and unmaps a 16 KiB frame stack (18 pairs per Create, a few us each). At "
        "c=32, a quarter of the loop's time is validation, a sixth `_creating`, a tenth the group's write. "
        "The three interceptors (telemetry, metrics, auth) were a fifth of the API's CPU per Create: with all "
        "three taken out, 2.05 -> 1.60-1.67 ms at c=32 on SQLite. Each ran a coroutine per call to find the "
        "handler and wrapped it anew. One interceptor (`services/deployments/calls.py`) now wraps each method's "
        "handler once and keeps it, each call reading its metadata from its context: 2.01 -> 1.81-1.84 ms at "
        "c=32 on SQLite, 1.71 and 1.92 -> 1.64 and 1.70 ms on PostgreSQL, two alternating pairs each. "
        "The relay's delete of what it sent went through SQLAlchemy (on SQLite a session transaction; the "
        "AUTOCOMMIT engine would have set and reset the isolation level on every use, a trip to aiosqlite's "
        "thread each): it is compiled once per padded count of ids and run on the driver's own connection, on "
        "SQLite with its commit in one trip (`sqlite_driver.execute_committed`): 0.52-0.55 -> 0.17-0.18 ms per "
        "call on SQLite, 0.37-0.39 -> 0.17-0.19 ms on PostgreSQL. A create with nothing to look up (no "
        "request_id, no quota: every create at c=1 here) is written the same way, its four executemany and "
        "commit in one trip on SQLite, one asyncpg transaction on PostgreSQL: c=1 on SQLite p50 3.6 -> 2.65 ms, "
        "API CPU per Create 3.7-3.8 -> 2.8 ms (three alternating pairs). Every server process now runs on "
        "uvloop: c=32 1.73 -> 1.60-1.65 ms of API CPU per Create. A URL's host was parsed five times per check "
        "(two failed address parsers each time): remembered, 11 -> 1 us. The full run of 9607883 came on a "
        "slower hour than the one before (the echo at c=32 4,375/s against 6,538/s): Create at c=32 595 and "
        "596/s, 0.136x and 0.139x the echo (0.095x and 0.089x before), and at c=1 a p50 5.2x and 6.1x the "
        "echo's (8.4x before). At c=32 the API still spends 1.6-1.8 ms of CPU per Create, three quarters of it "
        "in the handler (validation an eighth of the process's samples, the create's rows and the group's "
        "write), the rest gRPC's callbacks and the loop. The full run of b7bb775 (the same product code but for "
        "a dropped attribute), an hour later: 674 and 649/s at c=32, 0.174x and 0.15x the echo, and at c=1 a "
        "p50 4.6x and 5.6x the echo's."
        " Every server process now freezes what it loaded before it serves (`gc.freeze()` in "
        "`apphosting_cli/main.py`): the collector's full passes no longer walk the API's 130,000 objects of "
        "modules and classes; instructions per Create at c=8 (callgrind, untraced) 5.54 -> 5.49 M, in the "
        "collector 77k -> 31k. The full run of d9d020f came on a fast hour (the echo at c=32 7,360/s against "
        "3,871/s): 963 and 931/s at c=32, 0.131x and 0.132x the echo, and at c=1 a p50 of 1.77 and 2.20 ms, "
        "4.7x and 5.9x the echo's."
        " Since then a create's Deployment is built once, for its placement request and for its answer (the "
        "outbox builder is given the Deployment the change answers with, so an applied change with an outbox "
        "builds one too, not two); an ORM row's columns are read from what it holds instead of through its "
        "instrumented attributes (`convert.columns_of`; a new record's columns it was not given as None, as "
        "the attributes read them, a stored row's unloaded ones still through the attribute); a create's "
        "observed fields are read once; and validation's checks for control characters and whitespace are one"
        " regex search of a value instead of a test per character. Instructions (callgrind, SQLite, "
        "untraced): `_creating` 1.16 -> 0.68 M, `validate_create` 1.03 -> 0.95 M, the API per Create 5.51 -> "
        "4.67 M at c=8 (600 Creates) and 6.00 -> 5.12 M at c=1 (300 Creates). The full run of 42c5883 came on"
        " the slowest hour measured so far (the echo at c=32 2,330/s, against 7,360/s in the run of d9d020f "
        "and 3,871/s in that of b7bb775; the API's CPU per Create at c=32 3.7 ms where it was 1.1-1.2 ms), so"
        " every goal stated in deployments or updates per second, or in milliseconds, follows the machine in "
        "that run; the ratios to the same run's ceilings and the instruction counts are what compare. In it: "
        "355 and 325/s at c=32, 0.152x and 0.15x the echo (0.131x and 0.132x in the run of d9d020f), and at "
        "c=1 a p50 of 6.1 and 7.5 ms, 7.5x and 10.4x the echo's (4.7x and 5.9x): at c=1 the API is busy on "
        "one core for the whole of each create, and the slow hour's lost cycles were more its than the "
        "echo's."
        " The full run of 5b151b4 came on a fast hour (the echo at c=32 8,483/s on SQLite and 7,087/s on Post"
        "greSQL, against 2,330/s in the run of 42c5883): 1,051 and 936/s at c=32, 0.124x and 0.132x the echo,"
        " and at c=1 a p50 of 1.67 and 2.24 ms, 4.4x and 5.8x the echo's 0.38 ms. Its product changes since 4"
        "2c5883 do not show in it: validation's allow-tags pattern is compiled by RE2 (google-re2, which keep"
        "s the patterns it compiled last) instead of a translation to Python's re, 93 -> 82 us per `validate_"
        "create` of the bench's request, and the API's instructions per Create at c=8 were 4.548 and 4.540 M "
        "before and after (callgrind, 400 Creates, SQLite). Timed in aiosqlite's thread at c=1 (1,500 Creates"
        "), a create's write with its commit takes 0.24 ms and the relay's delete of its outbox row 0.20 ms; "
        "py-spy puts a third of the API's busy samples at c=1 in that thread."
        " The full run of 0bdd212 came on a slow hour (the echo at c=32 2,275/s on SQLite and 2,600/s on "
        "PostgreSQL, against 8,483/s and 7,087/s in the run of 5b151b4): 303 and 371/s at c=32, 0.133x and "
        "0.143x the echo, and at c=1 a p50 of 5.9 and 6.1 ms, 6.1x and 6.0x the echo's. Its product changes "
        "since 5b151b4 are off this stage's path (tracing, which is off here; the metrics' index, see "
        "pipeline): the API's instructions per Create untraced at c=8 were 4.54-4.58 M before and 4.61-4.63 "
        "M after (callgrind, 400 Creates), the aiosqlite thread's share 0.260 and 0.262 M; the rest moves "
        "with the size of the groups a run happens to write."
        " The full run of f457b21 came on a middling hour (the echo at c=32 4,049/s and 3,951/s): 676 and "
        "583/s at c=32, 0.167x and 0.147x the echo, and at c=1 a p50 of 2.6 and 4.0 ms, 4.0x and 6.1x the "
        "echo's. Its product change since 0bdd212 (see watch) is off this stage's path."
        " Since then a lone create on PostgreSQL is one statement: its four single-row inserts joined by "
        "`_together` in services/deployments/store.py (all but the last in a WITH, their parameters numbered "
        "on), atomic by itself and checked against the foreign keys once all of it has run, with no BEGIN or "
        "COMMIT, where it was a transaction of four executemany (six round trips, each a wake-up of the "
        "server's backend): asyncpg alone 557-613 -> 95-100 us per write (270 -> 38 us of CPU); the stage on "
        "PostgreSQL, base and change alternating, two pairs: c=1 p50 3.15 and 3.18 -> 2.66 and 2.65 ms (5.8x "
        "-> 5.1x the echo's), 305-311 -> 370/s; c=32 unchanged (its groups are written in a session). The "
        "full run of 1099751 came on a fast hour (the echo at c=32 6,449/s and 5,918/s): 711 and 649/s at "
        "c=32, 0.110x and 0.110x the echo, and at c=1 a p50 of 2.64 and 2.75 ms, 4.5x and 5.3x the echo's "
        "(6.1x on PostgreSQL in the run of f457b21)."
    ),
    "pipeline": (
        "The API's event consumer is the limit; the scheduler and provisioners are idle in profiles. Done "
        "since the first report: events are applied by one task in batches, all that are waiting in one "
        "transaction (`DeploymentStore.apply_batch`), each apply is one transaction instead of two, and "
        "consumers fetch one message and then what is already waiting instead of waiting for a full batch "
        "or a second. Measured with `--only pipeline` before and after on this machine: 4.1 and 3.5/s "
        "became 8.4 and 9.9/s (1 and 4 provisioners). Since then an event stores only the fields it "
        "changed, not a snapshot of the whole record. Then each event cost five ORM statements (select the "
        "record, select the event id, `UPDATE`, select the record again, insert the event); now `apply_batch` "
        "reads all the batch's records and seen event ids in two statements, writes each record with one Core "
        "`UPDATE` (the record after it built from the values written, not read again) and inserts the "
        "batch's events in one executemany: 11.8 and 10.4/s became 19.0 and 25.6/s on SQLite, 2.6 and "
        "17.6/s became 22.6 and 32.6/s on PostgreSQL (1 and 4 provisioners, full runs on a loaded machine). "
        "Consumers: a consumer fetched one message, then drained with `fetch(n, timeout=0.02)`, which nats-py "
        "sends, when nothing waits, as `no_wait` with `expires`: the server holds it as a lingering pull, so a "
        "message stored meanwhile was handed over only when the 20 ms were up, on every hop (placement "
        "requests, jobs, status events). Now each consumer keeps one pull open (up to its free slots, 1 s) on "
        "an inbox of its own and starts a handler from the subscription's callback as each message comes: what "
        "waits comes at once, filling the applier's batch as before, and a new pull is sent only when there is "
        "room. The heartbeat is a loop timer instead of a task per message. In profiles of this stage the "
        "consumer's own frames (pull, span, heartbeat, task) were 0.5-2.2 % of each process before and 0.6-1.8 % "
        "after: the per-message cost was small, the waiting was not. publish -> handler at 50 msgs/s, side by "
        "side in four pairs on the loaded 2-core machine: p50 1.3-1.8 -> 0.9-1.3 ms, p99 4.5-19 -> 3.3-11 ms; "
        "500 at once handled in 78-181 -> 40-111 ms. The stage itself (300 deployments, 5 s offered, two "
        "alternating rounds with load averages of 6 to 14) moved within its noise: SQLite 17.8/31.5 -> "
        "25.8/24.8/s with 1 provisioner, 7.9/26.4 -> 32.1/19.3/s with 4; PostgreSQL 15.9/20.9 -> 6.4/18.5/s "
        "and 6.3/25.5 -> 6.6/14.8/s (the first round's after run predates waiting for a free slot); "
        "a quiet full run is needed to tell. "
        "Still open (not profiled since): a `Deployment` built by `row_to_proto` per event. "
        "Offered 100 Creates/s (an open loop), the "
        "pipeline takes them in at once but brings 45-60/s (the full run of 3d91fc3; about 30/s before the "
        "report window) "
        "to `running`, so the rest queue and create→running grows through the run: its p99 (tens of seconds) "
        "follows from the rate, and falls under 1 s only once the pipeline runs faster than it is offered. "
        "Fewer, coarser events: steps a provisioner finishes within `--report-window` (0.25 s) of each other "
        "share one event (`_Held` in provisioner/reconcile.py; at first `vcluster_ready`, which the API times, "
        "was never held), so at zero delay a create applies three events in the API (placement, `vcluster_ready`, "
        "`endpoint`) instead of seven; `--only pipeline` at 300 deployments, two alternating runs each on a "
        "machine loaded by other runs (load 7-16 on 2 cores, so wide spread): SQLite 24.0 and 35.5/s became "
        "38.9 and 44.1/s with 1 provisioner, 28.2 and 25.7/s became 52.9 and 26.0/s with 4; PostgreSQL 11.7 "
        "and 8.6/s became 15.4 and 26.8/s with 1, 7.3 and 19.7/s became 23.5 and 14.7/s with 4 (the Creates "
        "themselves were accepted at only 32-46/s in most of these runs). "
        "Since then `vcluster_ready` is held too (the API times placement to vCluster ready from the "
        "`VClusterReady` condition's time, on whichever event carries it first, once per deployment), so a "
        "create applies two events (placement, `endpoint`) instead of three; `--only pipeline` at 300 "
        "deployments on SQLite, two alternating pairs (load 9-14): 37.0 and 51.4/s before, 35.3 and 32.1/s "
        "after with 1 provisioner, 37.5 and 42.2/s before, 43.1 and 38.4/s after with 4; p99 at 100/s offered "
        "8.9 and 5.3 s before, 6.4 and 12.9 s after: within this machine's noise. "
        "Then, timed per stage inside the API on a quiet machine: the Creates themselves were accepted at "
        "only 50-75/s while the pipeline ran (200-300/s alone), placements following them second by second, "
        "and no process was busy (API 65 %, scheduler 40 % of a core). On SQLite the scheduler's ledger shares "
        "the API's file, and each placement was a write transaction of its own (`BEGIN IMMEDIATE`, the clock, "
        "the holding, the insert, the totals, the clock), so the two processes' writers took turns through "
        "SQLite's sleeping busy handler. The ledger now places the requests waiting at one moment in one "
        "transaction (`Ledger.place` queues its caller, like the API's creates; an update's `set_reservation` "
        "joins the same group), and the scheduler handles 32 requests at once instead of 8. `--only pipeline` "
        "at 600 deployments with 4 provisioners, alternating (load 5-10): SQLite 48.5 and 61.8/s -> 88.9 and "
        "94.4/s, p99 at 100/s offered 6.1 and 4.1 s -> 1.3 and 1.6 s; PostgreSQL within its noise "
        "(24-80/s either way), where the API's event applier is busy the whole run (batches of 50 events at "
        "p50 0.67 s). "
        "Then a batch cost two round trips per event on PostgreSQL (its `UPDATE`, and marking the release "
        "healthy), each a turn of the busy event loop, and two ORM-constructed rows per event; now "
        "`_Batch.flush` writes the batch's records in one statement per set of columns (PostgreSQL: `UPDATE "
        "... FROM unnest(arrays) RETURNING id`; SQLite: one executemany), each still only at the revision "
        "read, marks the healthy releases in one executemany, and builds its rows without the ORM "
        "constructor: `apply_batch` of 50 events in process 1.74 -> 0.35 ms per event on PostgreSQL, 1.35 -> "
        "0.23 ms on SQLite; the stage at 600 deployments, alternating (load 4-8, then 1-3): SQLite 42.9/63.8 "
        "-> 82.2/75.0/s, PostgreSQL 39.6/66.3/70.0 -> 56.9/51.0/87.0/s (p99 at 100/s offered 9.7/4.0/3.5 -> "
        "6.7/3.5/1.2 s). Still open: the lifecycle metrics of each `endpoint` event "
        "(`ApiMetrics._first_vcluster_ready`, two queries on a pooled connection) took an eighth of the API's "
        "samples, more than the batches themselves. It became one statement; profiled again with py-spy "
        "(PostgreSQL, 4 provisioners, 1,000 deployments) it was still 13 % of the API's samples, 30 % of them in "
        "asyncpg's `connect`: each event's look-up checked out a connection of its own beside the applier's, "
        "the pool (10, overflow 20) overflowed, and every overflow connection was opened anew and closed "
        "again. The look-ups asked at one moment now share one statement on one connection "
        "(`apphosting.batching.Batcher`, the group commit the ledger uses too): the placement and "
        "vCluster-ready events of all their deployments, a few rows each, judged in Python. The stage at 600 "
        "deployments, alternating on the loaded machine (load 4-8): PostgreSQL 28.9/36.2 -> 37.6/44.8/s "
        "(p99 at 100/s offered 9.9/7.9 -> 6.1/4.3 s), SQLite 52.1/48.8 -> 58.9/82.9/s (5.4/4.6 -> 4.6/2.0 "
        "s). The relay's read of unsent rows (an ORM session: pool checkout, BEGIN, SELECT, ROLLBACK) was "
        "the next largest database cost outside the batches, 6-8 % of the samples; it is now one driver call "
        "on the pooled connection, as a page is read (`DeploymentStore._fetch`), and so is an operation's "
        "read of its record (`DeploymentStore.record`). The stage at 600 deployments, alternating, while "
        "tests ran beside the first pair (load 3-5): PostgreSQL 36.1/60.5 -> 42.7/58.5/s, SQLite 40.2/77.6 -> "
        "82.6/78.4/s (p99 at 100/s offered 11.2/3.7 -> 8.8/2.8 s and 6.5/3.4 -> 4.1/4.0 s): within the noise "
        "but for the loaded first pair. "
        "The stage now reports each process's CPU time per deployment (the table above), a figure that "
        "repeats within a few per cent where the rates do not: on a quiet machine, 4 provisioners, SQLite "
        "API 3.2, scheduler 1.0, provisioners 1.0, nats-server 0.5 ms (6.0 in all, room for about 330/s on "
        "two cores), PostgreSQL 3.8, 1.6, 1.2 and 0.8 ms (7.8, besides the PostgreSQL server's own). So the "
        "API is about half of the stage's CPU, and no single part of it dominates (py-spy, SQLite, of its "
        "busy samples): the Create call (its validation, the group's insert, the answer) a quarter, native "
        "code under the loop's callbacks (gRPC's C core among it) a third, the event batches a sixth. "
        "Two of those costs went down since. The scheduler wrote a "
        "group's location totals with one upsert per location; one statement for all of them now "
        "(`Ledger._count`, netted per location, in the order of location ids): scheduler CPU per deployment "
        "SQLite 0.99 and 1.14 -> 0.87 and 0.87 ms, PostgreSQL 1.73 and 2.11 -> 1.45 and 1.51 ms. Each SQLite "
        "statement is one trip to aiosqlite's thread (see create): SQLite 208 and 245 -> 250 and 255/s, API "
        "CPU per deployment 3.85 and 3.32 -> 3.23 and 3.12 ms, p99 at 100/s offered 323 and 199 -> 179 and "
        "150 ms (two alternating pairs, load 2-3.6). A cache of the provisioner's derived names (a tenth of "
        "its reconcile loop in-process) was tried and not kept: 3 % of the provisioners' CPU, within the "
        "noise of the stage. In the full run of 9607883 PostgreSQL with 4 provisioners gave 190/s: right "
        "after it, the stage alone on the commit before uvloop, run four times alternating asyncio's loop and "
        "uvloop, gave 198.5, 172.2, 170.4 and 152.9/s, and the nats-server's own CPU per deployment, which no "
        "change of ours touches, went from 0.57 to 1.22 ms between runs: on this hour the machine, not the "
        "code, decided the verdict. The full run of b7bb775 gave 294.8 and 192.5/s."
        " The full run of d9d020f (a fast hour; every process's full collections cheaper, see create) gave "
        "444.2 and 232.3/s, the API's CPU per deployment 1.72 and 2.99 ms."
        " The full run of 42c5883 came on the slowest hour measured so far (the echo at c=32 2,330/s, against"
        " 7,360/s in the run of d9d020f and 3,871/s in that of b7bb775; the API's CPU per Create at c=32 3.7 "
        "ms where it was 1.1-1.2 ms), so every goal stated in deployments or updates per second, or in "
        "milliseconds, follows the machine in that run; the ratios to the same run's ceilings and the "
        "instruction counts are what compare. In it the API spent 5.6 and 8.1 ms of CPU per deployment with 4"
        " provisioners (1.7 and 3.0 ms in the run of d9d020f), and the stage brought 139 and 91/s to running,"
        " under the goal; this session's changes add no work to this path (an applied change builds its "
        "Deployment once now)."
        " The full run of 5b151b4, on a fast hour: 405.1 and 261.8/s with 4 provisioners, p99 create->running"
        " at 100/s offered 45 and 89 ms."
        " The full run of 0bdd212 came on a slow hour (the echo at c=32 2,275/s against 8,483/s in the run "
        "of 5b151b4): 164.4 and 107.8/s with 4 provisioners (405.1 and 261.8/s then), 208.6 and 102.7/s with "
        "one; offered 100/s, p99 create->running 407 and 334 ms. Since 5b151b4 the index of deletion times "
        "also holds status and region (for the metrics' count of live deployments, which read the whole "
        "table every 5 s), so on SQLite each status change also moves the row's entry in it: an UPDATE of a "
        "status in sqlite3 alone went from 11-12 to 17-20 us (200,000 rows, in memory), about five of them "
        "per deployment here. PostgreSQL already writes every index's entry on each update (updated_at is "
        "indexed, so no update is HOT)."
        " The full run of f457b21, on a middling hour (the echo at c=32 4,049/s): 261.4 and 174.9/s with 4 "
        "provisioners, 298.3 and 160.0/s with one; offered 100/s, p99 create->running 174 and 213 ms. Its "
        "change (a batch's records and event ids read by statements compiled once, see watch) takes about 1 ms "
        "of event loop CPU off a lone apply; here events come in batches, where that cost was shared, and "
        "two alternating pairs of this stage before and after it (a faster hour, 290-344/s on SQLite) showed "
        "no difference beyond their noise. The API's CPU per deployment on PostgreSQL (3.3-4.7 ms, against "
        "2.3-2.9 ms on SQLite) goes mostly to asyncpg's execution of the batch's statements and the "
        "transaction's BEGIN (py-spy under `_applier`: load 18 %, the flush 35 %, BEGIN 6 %)."
        " Since then the metrics' look-up of placement and vCluster-ready events for a batch of `endpoint` "
        "events is one statement compiled once per padded count of ids, run on the driver's own connection "
        "(`DeploymentStore.phase_events`; it was a select built anew on a pooled SQLAlchemy connection, on "
        "PostgreSQL with a BEGIN and a ROLLBACK around it): event loop CPU per look-up 482-521 -> 118-185 us on "
        "SQLite, 817-822 -> 142-226 us on PostgreSQL; and a batch asks its session for its connection once and "
        "runs its updates compiled once (see watch). Two alternating pairs of the stage against the commit "
        "before (8b2d898), on a quiet hour: the API's CPU per deployment with 4 provisioners 3.33 and 3.00 -> "
        "2.70 and 2.70 ms on PostgreSQL (219.0 and 242.6 -> 257.8 and 256.7/s), 2.17 and 2.10 -> 2.02 and "
        "2.14 ms on SQLite. The full run of 1099751, on a fast hour: 337.0 and 246.6/s with 4 provisioners "
        "(API 2.25 and 2.81 ms per deployment), 396.6 and 279.0/s with one; offered 100/s, p99 create->running "
        "66 and 52 ms."
    ),
    "update": (
        "The API was the limit, as for the pipeline; the scheduler only forwards the job and the provisioners "
        "are mostly idle. An image update costs three transactions in the API, each with a thread hop per statement "
        "on SQLite (aiosqlite): the UpdateDeployment call itself (read the record, validate the whole spec again "
        "with `validate_create_resolving`, then `DeploymentStore.mutate`: a release row, the record, an event, "
        "an outbox row) and two worker events, each applied by `DeploymentStore._apply_in` (in a batch: the "
        "verdict on the release, one `UPDATE` of the record, its event inserted with the batch's). Done: an "
        "update reported four events (kubeconfig, app, rollout, endpoint); the steps that tell a watcher "
        "nothing on their own are now quiet (`_Step.quiet` in provisioner/reconcile.py), so it reports `app` "
        "and the final `endpoint`, which carries the rollout's condition (and with the provisioner's report "
        "window since, a fast update is one event, `endpoint` carrying `app`'s condition too): "
        "18.7/s before, 32/s after on SQLite "
        "in full runs of this benchmark (PostgreSQL 23.7/s and 24.3/s, about unchanged: its limit is not "
        "profiled yet). The simulated provisioners share their "
        "clusters through a SQLite file (`--simulate-state`, needed because any provisioner may take the "
        "update of a deployment another one created); `SimulatedState.claim` is their largest cost but they "
        "wait on the API. "
        "The cheaper event application of the pipeline (two reads per batch, one `UPDATE` per event) left "
        "this rate about where it was (SQLite 27.8/s then 25.8/s, PostgreSQL 32.0/s then 36.4/s): it followed "
        "the Update calls' own rate (26/s and 40/s), so the call itself was the limit. Profiled then, half of "
        "the call was its transaction (`DeploymentStore.mutate`, one each, waiting its turn for SQLite's "
        "writer) and an eighth validating the whole spec again. Done since: the Update calls waiting at one "
        "moment share a commit, as creates do (`DeploymentStore._mutate_group`: each planned on the record as "
        "the ones before it left it, refused to its caller only, written one by one after a conflict); an "
        "update validates only the fields its mask names with the fields the rules pair them with "
        "(`_judged` in servicer.py: the app type's required fields, the image with its update settings, "
        "storage with volumes), so an image update no longer parses the values YAML, the config or the "
        "volumes, nor resolves the chart's host; and the call reads its record with one Core statement "
        "(`DeploymentStore.record`). Measured with 300 deployments, before and after alternating on a "
        "loaded machine (load 10-15; medians of three runs each): on SQLite the Update calls went from "
        "21.6/s to 55.5/s (call p99 2.5 s to 1.5 s) and updates healthy from 19.9/s to 31.1/s; on "
        "PostgreSQL the difference stayed within the noise (calls 21.8/s and 23.2/s, p99 3.2 s and 2.7 s, "
        "healthy 14.7/s and 15.2/s). On SQLite the API is no longer busy in the profile (a quarter of its "
        "samples idle in `select`) and the calls are accepted faster than updates get healthy: what remains "
        "is the way from the call to the worker's report (the outbox relay, the scheduler, a provisioner, "
        "the event batch), not profiled yet. On PostgreSQL two thirds of the call is reading its record: a "
        "pool checkout with its pre-ping, a `BEGIN` and the `SELECT`, each a round trip; the group's own "
        "transaction is small beside it. The pre-ping is gone since: a pooled PostgreSQL connection is pinged "
        "on checkout only after 1 s idle (`apphosting.db`), checkout + `SELECT 1` 0.58-0.90 -> 0.33-0.38 ms "
        "at p50 on the loaded machine. "
        "The scheduler held each update's new release with a ledger transaction of its own "
        "(`set_reservation`); it joins the placements' group transaction now: updates healthy at 300 "
        "deployments, alternating (load 4.5-10), SQLite 43.1 and 27.3/s -> 49.7 and 62.3/s, PostgreSQL 28.1 "
        "and 22.3/s -> 55.4 and 35.3/s, now the Update calls' own rate. Timed inside the API, an Update call "
        "is its group's wait: on PostgreSQL a group of 15 spends p50 0.44 s in its transaction (one `UPDATE` "
        "round trip per record, besides the release, event and outbox rows), on SQLite 0.1 s there plus 0.1 s "
        "waiting for the writer behind the event batches and the relay's `DELETE`. "
        "Timed inside the API since (temporary timing code, 300 deployments, load 8-13): a group's members "
        "were most of its transaction, each member's release spec `UPDATE` (the spec the replaced release "
        "keeps) a round trip that also flushed the release and outbox rows of the member before it through "
        "the ORM (PostgreSQL: 10.5 of the 12.8 s the members took in one run), and each member ran in a task of "
        "its own for its caller's trace, waiting a turn of the event loop (1.3 ms of work, 9.7 ms waited at "
        "p50). Done: the batch keeps a group's new releases, the specs the replaced ones keep and the outbox "
        "rows, and its flush writes them one statement per kind (a rollback reads the releases after writing "
        "them); each member runs in its caller's context at once (`Context.run`), in a task only when its "
        "change must read (a failed rollout). The members of a run's groups took 12.8 s -> 0.8 s on "
        "PostgreSQL (5.5 -> 1.4 s on SQLite). Updates healthy at 300 deployments, alternating base and "
        "change (load 5.7-18): SQLite 24.9, 14.6, 29.2/s -> 30.6, 28.1, 30.4/s (Update calls 28, 15, 31 "
        "-> 35, 30, 33/s), PostgreSQL 13.1, 20.4, 15.8/s -> 20.1, 39.4, 34.6/s (calls 14, 21, 17 -> 23, "
        "48, 37/s). What remains in the group is its flush, its read of the records and its commit (on "
        "PostgreSQL p50 0.16, 0.06 and 0.03 s on the loaded machine, about eight round trips), the writer's "
        "wait on SQLite (half of each group's time, behind the event batches and the relay), and the call's "
        "own read of its record before the group (p50 35-70 ms there); the API had 20-30% of a core in "
        "`top`, the machine being shared. "
        "Timed again inside the API at 1,000 deployments (temporary timing code, SQLite, load 3-4): an "
        "Update call is p50 190 ms, nearly all of it `mutate`; a group of 15.6 members p50 120 ms, in which "
        "the API's event loop turned 190 times. SQLite's writer (the process's writer lock) was held p50 46 "
        "ms by an event batch or an update group, 20 ms by a create group and 12 ms by the relay's "
        "`DELETE`, and each waited 70-110 ms for it: the writers take turns, and each one's hold is "
        "stretched by the turns of a loop busy with the 32 calls around it (the relay's `DELETE` held it "
        "12 ms over two turns). One trip per statement (see create) took a group from about 72 to 51 trips "
        "and updates healthy from 125 and 119 to 131 and 143/s; what would shorten the holds further is "
        "writing a whole group in one trip to the database's thread, or a writer that does not share the "
        "loop with the calls. "
        "Measured since per process (CPU per update over the update phase, 1,000 deployments, quiet machine, "
        "SQLite/PostgreSQL): the whole machine was the limit, not the API alone: API 4.4/4.7 ms, scheduler "
        "3.0/2.9 ms, the four provisioners together 6.6 ms, nats-server 1.2 ms, some 16 ms where two cores "
        "at 200/s have 10. Done: the simulated state file keeps one connection per thread instead of opening "
        "the file (and setting WAL) for every call, is synced at checkpoints, and is asked whether an object "
        "exists and what it is like in one call (provisioners 6.6 -> 2.2 ms); the scheduler sets a "
        "reservation only when the release needs other than what the deployment holds, and reads the "
        "holdings asked at one moment in one statement (3.0 -> 0.6 ms); `DeploymentStore.get` (which "
        "`record` became) reads plain rows, concurrent reads in one statement (API 3.8 -> 3.1 ms on SQLite, "
        "4.9 -> 3.8 ms on PostgreSQL); on PostgreSQL the relay's `DELETE` runs alone, in autocommit. "
        "Single-stage runs: SQLite 114 -> 212-238/s, PostgreSQL 102 -> 155-199/s, the PostgreSQL figure "
        "moving by a third between runs of the same code. What remains on PostgreSQL is round trips, about "
        "2.8 per update (each group's `BEGIN` and `COMMIT`, and one per statement), each a socket write in "
        "the API and a wake-up of a PostgreSQL backend on a machine with no idle core. Counted in the API "
        "over the update phase on PostgreSQL (1,000 updates): 742 reads of records by id (each "
        "UpdateDeployment's read before it validates; the updates arrive one by one, so few share a "
        "statement), about 150 operation groups and 150 event batches of some seven trips each (BEGIN, "
        "read, write of records, releases, events, COMMIT), 200 relay cycles (read, delete). On a quiet "
        "machine the stage ran at 220-250/s on PostgreSQL and 273/s on SQLite. The full runs of this "
        "session, on slower hours (the echo at c=32 3,900-4,400/s against 6,500/s), gave 261.3 and 231.0/s, "
        "then 265.9 and 199.8/s: PostgreSQL on the goal's line, with nothing on the update path changed but "
        "the relay's delete (one call to the driver now) and the loop (uvloop)."
        " The full run of d9d020f gave 345.8 and 261.8/s."
        " The full run of 42c5883 came on the slowest hour measured so far (the echo at c=32 2,330/s, against"
        " 7,360/s in the run of d9d020f and 3,871/s in that of b7bb775; the API's CPU per Create at c=32 3.7 "
        "ms where it was 1.1-1.2 ms), so every goal stated in deployments or updates per second, or in "
        "milliseconds, follows the machine in that run; the ratios to the same run's ceilings and the "
        "instruction counts are what compare. In it 146.6 and 97.8/s reached healthy, under the goal."
        " The full run of 5b151b4, on a fast hour: 385.1 and 270.8/s."
        " The full run of 0bdd212, on a slow hour (see pipeline): 136.5 and 111.1/s (385.1 and 270.8/s in "
        "the run of 5b151b4)."
        " The full run of f457b21, on a middling hour: 258.1 and 189.3/s (PostgreSQL 0.95x the goal). Two "
        "pairs of this stage alone, before and after it, on a faster hour: SQLite 235.8 and 270.1/s before, "
        "233.7 and 283.6/s after; PostgreSQL 195.5 and 202.5/s before, 207.8 and 179.6/s after: on the "
        "goal's line, and within the noise."
        " The stage now reports each process's CPU per update (the table above), which repeats where the rate "
        "does not: three runs of one commit within minutes on a quiet hour gave 196.5, 247.6 and 239.2/s on "
        "PostgreSQL, the API's CPU 2.66-2.75 ms per update each time (SQLite about 2.05 ms). Of the whole "
        "stage's 6.4-6.7 ms per update on PostgreSQL the four simulated provisioners take 2.0 ms, the API 2.7, "
        "nats-server 0.7 and the scheduler 0.6, besides the database server's own. Against the commit before "
        "(8b2d898), two alternating pairs: the API's CPU per update on PostgreSQL 2.69 and 2.51 -> 2.39 and "
        "2.79 ms, within the noise (operations are written in groups, whose fixed costs are shared). The full "
        "run of 1099751, on a fast hour: 314.8 and 228.4/s."
    ),
    "watch": (
        "Memory, from tracemalloc of the API with 2,000 WatchDeployment streams open: 24 KiB per stream "
        "traced in Python before, 14 KiB after dropping the two largest: the ORM row (with its decoded JSON "
        "spec, about 5.5 KiB) that the handler held for the life of the stream, and each `Watcher`'s "
        "`asyncio.Queue` (three deques of 760 B and its futures; a list made at the first change and one "
        "future now). Measured at 10,000 streams: 46.7 and 46.3 KiB per stream before, 35.6 and 35.4 after "
        "(SQLite, PostgreSQL). What remains in Python is grpc's own (about 4 KiB of Cython call objects), the "
        "three interceptors that wrap every stream (auth, telemetry, metrics) and the handler's task; the rest is "
        "grpc's. The interceptors alone, 2,000 streams through them in one process under tracemalloc: 8.7 KiB per "
        "stream where the bare handler takes 1.8, 7.5 since each iterates the handler's result itself instead of "
        "through a helper async generator (each generator costs a frame and an entry in the event loop's weak set "
        "of generators) and a stream holds no span helper's generator while tracing is off. A bare grpc.aio "
        "server holding the same "
        "streams (`bench.echo`, measured in each run as `grpc_kib_per_stream`) takes 23 KiB per stream at "
        "10,000 by itself (call objects, C-core's call arena and HTTP/2 stream state), so the goal of 10 KiB "
        "cannot be met with one gRPC call per watched deployment on grpc.aio; it needs many deployments per "
        "stream (WatchDeployments with a set of ids) or a lighter server. Since then the three interceptors are "
        "one, whose wrapping is made once per method: a stream holds one generator of it, and a plain object for "
        "its log context and span: 34.3 -> 29.7 KiB per stream at 10,000 (SQLite, one run each, side by side). "
        "In the full run of 9607883 SQLite's p99 at 10,000 streams was 425 ms with a p50 of 4.9 ms: a stall "
        "of a few events (see the full collections below). The stage alone, four times right after "
        "(asyncio's loop and uvloop alternating), gave p99s of 11.4, 14.3, 11.8 and 13.2 ms; the full run of "
        "b7bb775 8.2 ms on SQLite and 12.8 ms on PostgreSQL (raw NATS 0.7 ms), 29.2 and 29.0 KiB per stream. "
        "Delivery: a status event reaches "
        "the watches only once the API has applied it to the database (see pipeline), so its p99 follows the "
        "apply batch's, not the fan-out, which visits only that deployment's watchers. The API's event "
        "consumer added up to 20 ms on top: its drain fetch lingered on the server for its whole timeout "
        "when a message came during it. It now keeps one pull open and hands each event to the applier as it "
        "arrives (see pipeline). At 100 and 1,000 streams, two alternating rounds on the loaded machine: "
        "SQLite delivery p50 16.5/58.5 and 18.8/10.5 ms before, 6.3/8.9 and 7.1/8.6 ms after; PostgreSQL "
        "(raw NATS p99 up to 68 ms in those runs) 132/10.9 and 158/65.8 ms before, 88/35.1 and 150/36.0 ms "
        "after. The p99s (40 ms to 1.6 s) followed the machine's load, not the code. In the full run of "
        "3d91fc3 the PostgreSQL p99 at 10,000 streams was 649 ms with a p50 of 12 ms: a stall that held a "
        "few events (3,000 deliveries make the p99 the 30 slowest, three events' worth). That stage alone, "
        "run again at once on the same machine, gave p99 32.1 ms (raw NATS 2.4 ms), and the base commit "
        "(ec1a95d) 25.2 ms beside it: the one-pull consumer does not show in this stage's p99, which is the "
        "applier's commit and the machine. Where the delivery time goes, timed inside the API with marks per "
        "event on the benchmark's monotonic clock (10,000 streams, `--only watch`, on a machine at load 7-13, so "
        "every figure is several times a quiet run's), p50s on SQLite: publish to the consumer holding the "
        "message 1.6 ms, to the applier taking it 0.2 ms, the applier's batch transaction 11.5 ms, commit to the "
        "deployment's watchers woken 0.4 ms, woken to the last of its 10 streams receiving it 4 ms (the ten wake "
        "one after another, 2 ms from first to last: each stream's step through the handler, the three "
        "interceptors and grpc's send); on PostgreSQL the same shape with 38 ms in the transaction. The p50 is "
        "the applier's commit first and grpc's writes second; the consumer and the hand-off hold nothing, and the "
        "fan-out visits only the deployment's own streams. The slowest events waited behind a batch being "
        "applied (handler to applier p99 115 ms on SQLite, 190 ms on PostgreSQL) and in their own commit, both "
        "following the machine. Garbage collection, timed with `gc.callbacks` (wall and thread CPU time): "
        "collections of the young generations cost the same at 1,000 and 10,000 streams (generation 0 about 1 ms, "
        "generation 1 6-9 ms of CPU on the loaded machine, two or three in a stage of 300 events), so they add "
        "alike to both levels' tails and do not grow them. A full collection grows with the streams: 10,000 "
        "streams hold 1.24 million objects the collector tracks, 124 per stream (8 coroutines, 5 async "
        "generators, 2 tasks, 12 functions and 18 closure cells among them), and while they opened it ran ten "
        "times, from 0.14 s of CPU at the first to 1.15 s (SQLite) and 0.95 s (PostgreSQL) at the last. Every "
        "delivery waits that long when one falls during events; none fell in the 6 s of events of any run (the "
        "next one comes once a quarter as many objects again as the last one kept have survived), which is why "
        "the stage's p99 seldom shows it, though the PostgreSQL stall of 649 ms in the run of 3d91fc3 has its "
        "size. `gc.freeze()` at start-up would take only the start-up's 150,000 objects out of it (an eighth); "
        "a freeze after every full collection would keep any cycle left by a closed stream for ever; neither is "
        "in. Fewer tracked objects per stream (many deployments per stream) is what shortens it. The benchmark's "
        "own process, holding the 10,000 client streams, paused as well: young collections of up to 35-136 ms "
        "a run (wall time, on the loaded machine) during the events, each delaying every arrival behind it, so "
        "part of the tail measured at 10,000 streams is the client's. The benchmark now freezes its own "
        "objects once a level's streams are open (`gc.freeze()` in bench/watch.py, undone after the stage), so "
        "its collections no longer pause the arrivals it times; the API is measured as before."
        " The full run of d9d020f: +9.6 ms (SQLite) and +6.6 ms (PostgreSQL) over NATS at 10,000 streams, 29.2 "
        "and 29.1 KiB per stream."
        " The full run of 42c5883 came on the slowest hour measured so far (the echo at c=32 2,330/s, against"
        " 7,360/s in the run of d9d020f and 3,871/s in that of b7bb775; the API's CPU per Create at c=32 3.7 "
        "ms where it was 1.1-1.2 ms), so every goal stated in deployments or updates per second, or in "
        "milliseconds, follows the machine in that run; the ratios to the same run's ceilings and the "
        "instruction counts are what compare. In it delivery p99 was 25.4 and 15.6 ms over raw NATS at 10,000"
        " streams; memory per stream 29.3 and 29.0 KiB (a bare grpc.aio server 23.2). Channel options of a "
        "bare grpc.aio server (HTTP/2 lookahead, frame and metadata sizes, retries off) and glibc's arena "
        "count leave its 23.1 KiB per stream as it is: no setting of grpc's brings one call per stream near "
        "10 KiB."
        " The full run of 5b151b4, on a fast hour: delivery p99 +6.7 and +8.6 ms over raw NATS at 10,000 stre"
        "ams; 29.3 and 29.0 KiB per stream (a bare grpc.aio server 23.2)."
        " The full run of 0bdd212, on a slow hour (the raw NATS p99 2.1 ms at 10,000 streams where it was "
        "0.55 ms): delivery p99 +29.3 and +16.3 ms over NATS at 10,000 streams; 29.3 and 29.1 KiB per stream."
        " Timed inside the API (from the message's arrival to its announcement), a lone status event spent "
        "0.6 ms in delivery from JetStream, 3.5 ms being applied and 0.1 ms being announced, of a delivery p50 "
        "of 5.5 ms: applying it was most of the path, and it was CPU on the event loop, not the database. "
        "`_Batch.load` and `_Batch.look_up` built a select with an IN list of the ids per call and ran it "
        "through the ORM session; they now run statements compiled once per padded count of ids (the records' "
        "one is get's) as driver SQL in the batch's transaction. Event loop CPU per lone apply (in process, "
        "alternating): SQLite 2.6-3.0 -> 1.7 ms, PostgreSQL 2.9 -> 1.9 ms; apply time inside the API during "
        "the stage, PostgreSQL p50 4.4 and 5.5 -> 3.6 and 4.7 ms (two alternating pairs). Delivery p50 in the "
        "stage, alternating: SQLite 5.3-6.6 -> 3.8-5.6 ms, PostgreSQL 5.8-8.7 -> 5.5-7.5 ms. The full run of "
        "f457b21 (a middling hour, the echo at c=32 4,049/s): +8.7 ms over NATS on SQLite at 10,000 streams "
        "(met), but +394.3 ms on PostgreSQL, where its p50 was 7.4 ms: a few applies stalled for 20-250 ms. "
        "The same stalls came in runs of the commit before it (39 of 900 applies over 20 ms in one, a p99 "
        "of 250 ms), so they are not this change's; they come with PostgreSQL's commits on this machine's "
        "shared disk and were not pursued further. 29.3 and 29.1 KiB per stream."
        " Since then a batch asks its session for its connection once (each ask was a greenlet and a proxy "
        "look-up in SQLAlchemy's asyncio layer, five per lone apply), and the records' update, the healthy "
        "marks and the kept specs run as statements compiled once (`_Write`) instead of through "
        "`session.execute`: event loop CPU per lone apply (in process, three alternating pairs) PostgreSQL "
        "1,567-1,650 -> 1,386-1,436 us, SQLite 1,134-1,191 -> 969-988 us; in batches of 30, 151-158 -> 142-149 "
        "and 135-140 -> 125-126 us per event. A native profile (py-spy --native) of the update stage on "
        "PostgreSQL put a fifth of the API's samples in the `write` system call under asyncpg's sends, but the "
        "API's system time per update is the same on both databases (0.52 and 0.55 ms, /proc): those samples "
        "are the writer preempted as it wakes the server's backend, so a round trip costs more in wall time on "
        "the loaded machine than in CPU. The full run of 1099751, on a fast hour: +7.9 ms (SQLite) and +7.2 ms "
        "(PostgreSQL) over NATS at 10,000 streams, no stall this time (PostgreSQL p50 4.7 ms); 29.1 and 29.2 "
        "KiB per stream (a bare grpc.aio server 23.2)."
    ),
    "placement": (
        "`Placer.place` scores every location of the region at once with numpy, over the arrays of a `Usage` "
        "the ledger builds from its per-location totals (`scheduler_location_usage`, kept in the transaction "
        "that changes a reservation): a few array operations per call, tens of µs at 10,000 locations where "
        "the loop took 3-5 ms, and the ledger reads one row per location holding capacity whatever the number "
        "of deployments. The scheduler calls `explain()`, which scores the same arrays and builds messages only "
        "for the 20 candidates it lists (61 ms at 10,000 locations before, about 0.1 ms at p50 now). The "
        "ledger keeps the totals it read between placements, with the tick of a clock row every writing "
        "transaction advances in commit order, and reads them again only when another process wrote: measured "
        "on SQLite with 10,000 locations, reserve went from 381 ms (p50, 100,000 reservations held, summed by "
        "GROUP BY) to 3.9 ms, and from 277 to 3.3 ms with 100 locations. With several scheduler processes "
        "placing in turn each still reads every location's totals row after the others' writes. A pinned "
        "placement (`check`, `set_reservation`) still builds a row for every location of the region."
    ),
    "list": (
        "The keyset index is used: a page from the middle of the table costs the same as the first, and the "
        "status and region filters use their indexes. p50 barely moves with table size. What varies is the "
        "p99, which tracks machine noise and the page cache (the table is about 1 GB at a million rows). The "
        "page's cost is fixed per row: it was 50 times `row_to_proto` (about 15 % of the API's samples) plus "
        "ORM hydration of the whole row, including the JSON spec (about 11 %), and aiosqlite (about 15 %). "
        "Done since: `DeploymentStore.page` reads only the columns a Deployment is made of, as Core rows, and "
        "`row_to_proto` reads such a row through its mapping, builds the message in one constructor call and "
        "the stored placement without `json_format` (61 to 2 µs a row); the API's CPU time for a 50-row page "
        "(read, convert, size, append) went from 4.4 to 2.9 ms on SQLite (7.4 to 3.0 ms when every row has a "
        "placement, which the bench's rows do not) and from 6.0 to 4.7 ms on PostgreSQL, measured side by "
        "side on the loaded 2-core machine, and the ORM left the SQLite profile (19 % of busy samples to 1 %). "
        "Then, from a breakdown of one request at 100,000 rows: the three interceptors cost about 1 % of the "
        "API's busy samples (no database read or key hash per call without auth), the page token a few µs; what "
        "remained was the database call itself: on SQLite four trips to aiosqlite's thread per page (cursor, "
        "execute, fetchall, close), on PostgreSQL a BEGIN and a ROLLBACK round trip around the fetch (asyncpg's "
        "`Transaction.rollback` alone was 8 % of samples), besides the pool's pre-ping. `page` now compiles the "
        "statement of each combination of filters once and runs it on the driver's own connection in one call "
        "(aiosqlite `execute_fetchall`; asyncpg `fetch`, prepared, outside a transaction), decoding the columns "
        "with their types' result processors, and each Deployment is made in place as the answer's next element "
        "(appending a finished message copied it, 2.5-5 µs a row). The event loop's CPU for a page read and "
        "converted went from 2.4 to 1.8 ms on SQLite and from 3.1 to 2.2 ms on PostgreSQL (in-process, side by "
        "side); p50 of the bench's pages at 100,000 rows, alternating runs on the loaded machine (load average "
        "6-12 on 2 cores): SQLite 4.1-5.7 to 3.2-3.4 ms, PostgreSQL 4.7-11.9 to 3.7-4.7 ms; their p99 under that "
        "load, 7-100 to 4.5-11 ms on SQLite and 9-62 to 15-88 ms on PostgreSQL, says more about "
        "the load. Left: the pool's pre-ping on PostgreSQL (one round trip per checkout, "
        "`apphosting.db.make_engine`), the JSON spec's decoding (about 5 µs a row with the standard library) "
        "and building the 50 messages; the p99 still tracks the machine's load more than the request. "
        "Then, on a machine too loaded for CPU timings to agree twice (load average 5-16), the cost of a page was "
        "counted in instructions under callgrind (the handler and its serialization in-process, 20 first pages at "
        "100,000 rows, counting switched on after a warm-up). By C function, with the JSON already read by pydantic's "
        "parser (below), the page's instructions went to the "
        "message's constructor (19 %), sqlite3's fetch in aiosqlite's thread (13 %), the JSON spec (11 %), the "
        "record's dict (12 %), `datetime.replace(tzinfo=UTC)` on SQLite's moments (6 %, 2 µs a call, five times "
        "the parse) and serialization with the byte bound's ByteSize (9 %). The query plans at "
        "1,000,000 rows (SQLite) are one index range each, no sort: (user_id, seq), (user_id, status, seq), "
        "(user_id, geographic_region, seq); `region_asia` reads one table page per row where the first page reads "
        "two rows a page, 0.3 ms in all, so its worse p99 was not its plan. `page` now selects the JSON columns as "
        "text on both databases and decodes them with pydantic_core's parser (already a dependency, twice "
        "json.loads' speed, the standard library kept for what only it reads), reads SQLite's moments with "
        "`datetime.fromisoformat` of the text and its offset, builds the record as one dict of the row and decodes "
        "only the columns that need it; `row_to_proto` passes the optional fields as they are (None leaves a field "
        "unset) and the config as a mapping to the one constructor call. Instructions per 50-row page: SQLite "
        "16.2 to 13.5 million, PostgreSQL 14.2 to 12.4 million (deterministic, base and change run side by side). "
        "Left, by the same count: the constructor, the driver's fetch and the JSON spec, each about a tenth to a "
        "fifth of a page. "
        "In the full run of 8976e96, on a quiet hour of a faster machine (the echo at c=1 p50 0.54 ms), the worst "
        "p99 at 1,000,000 rows was 5.2 ms on SQLite and 5.6 ms on PostgreSQL with p50s of 2-3 ms: the goal is "
        "missed by the slowest few of 300 pages, which follow the machine (the same queries at 10,000 rows had "
        "p99s of 3.4-4.7 ms). Since then SQLite's driver sends no rollback when no transaction is open "
        "(`apphosting/sqlite_driver.py`), so the pool's reset of the page's connection costs no trip to "
        "aiosqlite's thread: a page read in process 0.70 -> 0.61 ms on an idle loop. Of a request's 2.2 ms at "
        "p50 (10,000 rows, timed inside the API), the handler is 1.4 ms: the read 0.7 ms (0.3 ms in the thread, "
        "0.3 ms decoding 51 rows, 6 us each, a third of it the JSON spec) and 50 messages built (11 us each, "
        "half of it the constructor); the rest is gRPC on both sides. In the full run of 89cb64c the p50 was "
        "2.0-2.2 ms at 100,000 and 1,000,000 rows on both databases (2.6-2.7 ms in the run before); PostgreSQL's "
        "worst p99 at a million rows was 3.0 ms, SQLite's 7.4-10.8 ms for three of its four queries, run right "
        "after the 49 s insert into a 1 GB file (2.4-5.3 ms at 100,000 rows): the tail still follows the machine. "
        "Housekeeping's other look, for records keeping more than 1,000 events, counted every deployment's events "
        "every minute (95 ms on SQLite and 339 ms on PostgreSQL at 200,000 deployments of 5 events): it reads a "
        "partial index of those records now (`tables.LONG_HISTORY`, from each record's revision and its oldest "
        "kept one), 0.2 ms on both. The full run of b7bb775 gave worst p99s of 5.5 and 7.4 ms at 1,000,000 rows "
        "(4.3 and 5.8 ms an hour before, 3.4 and 4.5 ms in the run of 5f72395) on code this path did not change."
        " The full run of d9d020f: worst p99 6.2 ms on SQLite, only for its first query (the other three "
        "2.1-2.3 ms), and 3.6 ms on PostgreSQL. The stage alone right after it: SQLite 2.7 ms, PostgreSQL 3.6 "
        "ms. A pool handing out the connection used last (LIFO, so that a cold connection after the bulk "
        "insert is not met again) was tried against it, alone and right after: SQLite 2.5 ms, PostgreSQL 3.7 "
        "ms, no difference beyond the noise, and not kept."
        " The full run of 42c5883 came on the slowest hour measured so far (the echo at c=32 2,330/s, against"
        " 7,360/s in the run of d9d020f and 3,871/s in that of b7bb775; the API's CPU per Create at c=32 3.7 "
        "ms where it was 1.1-1.2 ms), so every goal stated in deployments or updates per second, or in "
        "milliseconds, follows the machine in that run; the ratios to the same run's ceilings and the "
        "instruction counts are what compare. In it the worst p99 at 1,000,000 rows was 12.9 ms on SQLite and"
        " 17.4 ms on PostgreSQL (p99s of 8.7-16.9 ms at every table size: the machine, not the size)."
        " The full run of 5b151b4: the worst p99 at 1,000,000 rows was 5.7 ms on SQLite, for `status_failed` "
        "alone (its p50 1.8 ms; the other three queries' p99s 2.0-2.4 ms), and 3.1 ms on PostgreSQL."
        " The full run of 0bdd212, on a slow hour: the worst p99 at 1,000,000 rows 16.7 ms on SQLite and "
        "13.4 ms on PostgreSQL, with p99s of 7-26 ms at every size: the machine, not the size."
        " The full run of f457b21, on a middling hour: the worst p99 at 1,000,000 rows 8.2 ms on SQLite and "
        "7.2 ms on PostgreSQL (p99s of 4-14 ms at every size); this path did not change."
        " The stage alone on a quiet hour (1099751's parent): the worst p99 at 1,000,000 rows 4.2 ms on SQLite "
        "and 5.06 ms on PostgreSQL (`first_page`; the other three 2.9-4.1 ms). The full run of 1099751, on a "
        "fast hour: 4.5 ms on SQLite (met) and 7.0 ms on PostgreSQL, for `middle_page` alone (the other three "
        "3.2-3.9 ms); this path did not change."
    ),
    "telemetry": (
        "Metrics and tracing cost the same per Create as before, about 0.2 ms of the API's time (spans made, "
        "batched and encoded for OTLP in the exporter's thread, beside the counters), but the Creates they are "
        "measured against got faster: 150-160/s at c=32 in the run of 6db0470 on a slow hour, 470-500/s now. So "
        "the overhead, a share of a shorter request, moved up to the goal's line: 9.0 and 11.1 % (SQLite, "
        "PostgreSQL) in the full run of 8976e96, then 10.0 and 10.0 %, and 3.1 and 8.5 % in two runs of the "
        "stage alone right after it. Then Creates got faster again (custom values YAML through libyaml, see "
        "create) and the same cost became 12-14 % in single runs of the stage. Measured in process: a server "
        "span made and ended costs about 18 us on the event loop, its OTLP encoding about 27 us in the "
        "exporter's thread (`encode_spans`, Python, under the GIL), the trace context written into each "
        "outbox row about 5 us: some 50 us, a quarter of the 0.2 ms the stage shows; the rest is not "
        "accounted for yet. A GIL convoy behind the exporter's thread was ruled out: a 0.5 ms switch "
        "interval in the traced API (instead of 5 ms) left the overhead as it was (two pairs of runs, "
        "PostgreSQL, default then 0.5 ms: 12.3 and 12.4 %, then under 10 and 11.1 %). "
        "The full run of 89cb64c then measured 6.4 and 9.7 %. Metrics alone cost 0.6 % (the stage with the "
        "traced API's OTEL_* variables removed, SQLite): tracing is nearly all of it. "
        "Left: an encoder of our own for the spans' few fixed attributes, or exporting from another process. "
        "In the full run of 9607883 the Creates it is measured against were faster again (one interceptor instead "
        "of three, uvloop; see create) and tracing's share rose with it: 13.7 and 11.1 %, then 13.0 and 13.1 % "
        "in the run of b7bb775. The stage now reports the API's CPU time per Create, off and on. Counted in "
        "instructions (callgrind, concurrency 8, 400 Creates), tracing added 0.61 M to the API's 5.45 M per Create, "
        "half of it in the exporter's thread: OpenTelemetry's encoder made each span, attribute and value a "
        "message of its own and copied it into its parent (upb copies by encoding and decoding), and grouped "
        "spans by their resource's hash, which writes the resource's attributes as JSON for every span. The "
        "exporter's requests are now built in place (`apphosting/otlp.py`, the same request, compared in its "
        "test): 22.3 -> 7.6 us per span, encoded and serialized. The server span was also two generator context "
        "managers deep; `tracing.Current` starts it and makes it current directly: 325k -> 296k instructions "
        "per call on the event loop (81k untraced). At concurrency 1 the traced API's instructions per Create "
        "went 6.49 -> 6.38 M (5.99 M untraced). The stage alone, alternating the two commits on a quiet machine, "
        "SQLite: 13.3 and 10.6 % before, 9.7 and 14.0 % after; the API's extra CPU per Create 0.18 and 0.14 ms "
        "before, 0.12 and 0.18 ms after: the cost went down by less than the stage's noise. What is left on "
        "the event loop is mostly the SDK's own span (its sampler, ids, attribute checks and locks), about "
        "27 us per call in process; a span type of our own in its place would save perhaps 10 us, and was "
        "not tried."
        " The full run of d9d020f measured 5.4 and 8.6 %."
        " The full run of 42c5883 came on the slowest hour measured so far (the echo at c=32 2,330/s, against"
        " 7,360/s in the run of d9d020f and 3,871/s in that of b7bb775; the API's CPU per Create at c=32 3.7 "
        "ms where it was 1.1-1.2 ms), so every goal stated in deployments or updates per second, or in "
        "milliseconds, follows the machine in that run; the ratios to the same run's ceilings and the "
        "instruction counts are what compare. In it 12.7 and 11.2 %: the API's CPU per Create off and on 3.71"
        " and 4.26 ms on SQLite. Tracing costs the same instructions as before, and the Creates it is "
        "measured against got 15 % cheaper in instructions, so its share rose."
        " The full run of 5b151b4 measured 13.0 and 22.0 %: the API's CPU per Create off and on 1.00 and 1.33"
        " ms on PostgreSQL. The stage alone twice right after it: 8.9 and 5.1 %, then 8.1 and 5.0 %, the API'"
        "s CPU per Create 0.08-0.10 ms more with telemetry on each time; the full run's PostgreSQL figure was"
        " that run's noise, and these docs keep the full run's figures."
        " Since then the spans are made by `apphosting/spans.py` instead of the SDK's tracer: a ReadableSpan "
        "filled in place and handed to the SDK's processors when it ends, with the provider's sampler, ids, "
        "resource and span limits (the same export, compared in its test). Started and ended with the "
        "server's attributes: 25.5 -> 7.8 us in process; a traced Create call's span, log context and outbox "
        "headers 68-95 -> 34-41 us (10-16 us untraced). Counted in instructions (callgrind, SQLite, c=8, 400 "
        "Creates after a warm-up): 4.58 M per Create untraced; traced 4.945 -> 4.849 M, so tracing's share "
        "0.365 -> 0.269 M, 0.11 M of it on the event loop and about 0.15 M in the exporter's thread (mostly "
        "the request's encoding; with the load slowed down by callgrind, its batches are smaller than at "
        "full speed). An encoder writing the wire format directly in Python was tried: 86 -> 73 thousand "
        "instructions per span, and not kept for that. Metrics add about 4.5 us per call (two counters and "
        "a histogram). The stage alone on a slow hour (the API's CPU per Create 2.4-3.1 ms), base and change "
        "alternating: 6.7, 6.7, 5.9 and 11.1 % before, 9.6, 12.5, 7.4 and -3.5 % after: at this size the "
        "change is below the stage's noise, which the instruction counts are not."
        " In the full run of 0bdd212 (a slow hour): -0.2 and -2.5 %, the API's CPU per Create off and on "
        "2.660 and 2.668 ms on SQLite and 2.728 and 2.717 ms on PostgreSQL."
        " In the full run of f457b21 (a middling hour): -1.4 and -2.6 %, the API's CPU per Create off and on "
        "1.955 and 1.957 ms on SQLite and 1.682 and 1.624 ms on PostgreSQL."
        " In the full run of 1099751 (a fast hour): 4.6 and 2.0 %, the API's CPU per Create off and on "
        "1.499 and 1.571 ms on SQLite and 1.418 and 1.457 ms on PostgreSQL."
    ),
}


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


# One check of a target on one database: what it asks, what was measured, whether it holds (None:
# not measured in this run) and, when it does not, by how much.
Check = tuple[str, str, bool | None, str]


def _check(label: str, measured: str, met: bool | None, shortfall: str = "") -> Check:
    return (label, measured, met, shortfall if met is False else "")


def _target(name: str, goal: str, checks: dict[str, list[Check]]) -> dict[str, Any]:
    """A target judged from its checks on every database: met when every check holds on each.

    The verdict and what holds the target back are written from the figures alone; the profile
    notes in FINDINGS only add where the time goes.
    """
    results = [met for per in checks.values() for _, _, met, _ in per]
    if not results:
        met: bool | None = None
    elif any(result is False for result in results):
        met = False
    elif any(result is None for result in results):
        met = None
    else:
        met = True
    held_back = [
        f"{label} on {kind}: {shortfall}" if len(checks) > 1 or kind != "-" else f"{label}: {shortfall}"
        for kind, per in checks.items()
        for label, _, ok, shortfall in per
        if ok is False
    ]
    unmeasured = sorted({label for per in checks.values() for label, _, ok, _ in per if ok is None})
    measured = (
        "; ".join(
            (f"{kind}: " if kind != "-" else "") + ", ".join(text for _, text, _, _ in per if text)
            for kind, per in checks.items()
        )
        or "—"
    )
    if met is None and not results:
        verdict = "not measured in this run"
    elif met is None:
        verdict = "not known: not measured in this run: " + ", ".join(unmeasured)
    elif met:
        verdict = "met"
    else:
        verdict = "not met: " + "; ".join(held_back)
    return {
        "name": name,
        "goal": goal,
        "measured": measured,
        "met": met,
        "verdict": verdict,
        "held_back": held_back,
        "unmeasured": unmeasured,
        "finding": FINDINGS.get(name, ""),
    }


def _by_database(results: dict[str, Any], stage: str) -> dict[str, Any]:
    """A stage's figures per database; a JSON from before databases were compared holds SQLite's alone."""
    node = results.get(stage)
    if not isinstance(node, dict):
        return {}
    return node.get("by_database") or {node.get("database", "sqlite"): node}


def _at_least(label: str, value: float | None, goal: float, text: str, unit: str = "") -> Check:
    if value is None:
        return _check(label, "", None)
    below = f"{goal / value:.1f}x below" if value else "far below"
    return _check(label, text, value >= goal, f"{value:g}{unit} is {below} the goal of {goal:g}{unit}")


def _at_most(label: str, value: float | None, goal: float, text: str, unit: str = "") -> Check:
    if value is None:
        return _check(label, "", None)
    return _check(label, text, value <= goal, f"{value:g}{unit} is {value / goal:.1f}x the goal of {goal:g}{unit}")


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's targets, each judged on every database the run measured."""
    targets = []

    create_checks: dict[str, list[Check]] = {}
    for kind, entry in _by_database(results, "create").items():
        ratio = _get(entry, "by_concurrency", "32", "ratio_to_echo")
        rps, echo = (
            _get(entry, "by_concurrency", "32", "create", "rps"),
            _get(entry, "by_concurrency", "32", "echo", "rps"),
        )
        p50_ratio = entry.get("p50_ratio_to_echo_at_1")
        create_checks[kind] = [
            _at_least(
                "Create/s at concurrency 32",
                ratio,
                create.GOAL_RATIO_AT_32,
                f"{rps}/s vs echo {echo}/s = {ratio}x",
                "x",
            ),
            _at_most(
                "p50 at concurrency 1",
                p50_ratio,
                create.GOAL_P50_RATIO_AT_1,
                f"p50 {p50_ratio}x the echo's at c=1",
                "x",
            ),
        ]
    targets.append(
        _target(
            "create",
            f"Create ≥ {create.GOAL_RATIO_AT_32}x the echo ceiling at concurrency 32, and p50 at concurrency 1 ≤ "
            f"{create.GOAL_P50_RATIO_AT_1:g}x the echo's, on each database",
            create_checks,
        )
    )

    pipeline_checks: dict[str, list[Check]] = {}
    for kind, entry in _by_database(results, "pipeline").items():
        per_second, provisioners = entry.get("per_second"), entry.get("provisioners")
        rate = _at_least(
            "deployments running/s",
            per_second,
            pipeline.GOAL_PER_SECOND,
            f"{per_second}/s with {provisioners} provisioners",
            "/s",
        )
        if provisioners != 4:
            # The goal is for 4 provisioners; a run with fewer measures something else.
            rate = _check(rate[0], rate[1], None)
        offered = entry.get("offered") or {}
        p99 = _get(offered, "create_to_running", "p99_ms")
        # Deployments still on their way when the run ended count as the whole wait: a lower bound.
        bound = "" if offered.get("complete") else "≥ "
        pipeline_checks[kind] = [
            rate,
            _at_most(
                f"p99 create→running at {pipeline.OFFERED_PER_SECOND:g}/s offered",
                p99,
                pipeline.GOAL_OFFERED_P99_MS,
                f"p99 create→running {bound}{p99} ms at {offered.get('offered_per_second')}/s offered "
                f"({offered.get('running')} of {offered.get('offered')} running)",
                " ms",
            )
            if offered.get("provisioners") == 4
            else _check(f"p99 create→running at {pipeline.OFFERED_PER_SECOND:g}/s offered", "", None),
        ]
    targets.append(
        _target(
            "pipeline",
            f"≥ {pipeline.GOAL_PER_SECOND:.0f} deployments/s reaching running with 4 simulated provisioners at zero "
            "delay, and p99 create→running ≤ 1 s when offered 100/s, on each database",
            pipeline_checks,
        )
    )

    update_checks: dict[str, list[Check]] = {}
    for kind, entry in _by_database(results, "update").items():
        per_second = entry.get("per_second")
        latency = entry.get("update_to_healthy") or {}
        update_checks[kind] = [
            _at_least(
                "image updates healthy/s",
                per_second,
                update.GOAL_PER_SECOND,
                f"{per_second}/s (update→healthy p50 {latency.get('p50_ms')} ms, p99 {latency.get('p99_ms')} ms)",
                "/s",
            )
        ]
    targets.append(
        _target(
            "update",
            f"≥ {update.GOAL_PER_SECOND:.0f} image updates/s reaching healthy (simulated driver, zero delay), on each "
            "database",
            update_checks,
        )
    )

    watch_checks: dict[str, list[Check]] = {}
    for kind, entry in _by_database(results, "watch").items():
        streams, p99, nats_p99 = entry.get("streams"), entry.get("p99_ms"), entry.get("nats_p99_ms")
        kib, grpc_kib = entry.get("kib_per_stream"), entry.get("grpc_kib_per_stream")
        over = None if p99 is None or nats_p99 is None else round(p99 - nats_p99, 1)
        watch_checks[kind] = [
            _at_least(
                "streams",
                streams,
                watch.GOAL_STREAMS,
                f"{streams:,} streams" if streams is not None else "",
                " streams",
            ),
            _at_most(
                "delivery p99 over raw NATS p99",
                over,
                watch.GOAL_OVER_NATS_MS,
                f"p99 {p99} ms vs NATS p99 {nats_p99} ms (+{over} ms)",
                " ms",
            ),
            _at_most(
                "memory per stream",
                kib,
                watch.GOAL_KIB_PER_STREAM,
                f"{kib} KiB/stream" + (f" (a bare grpc.aio server: {grpc_kib})" if grpc_kib is not None else ""),
                " KiB",
            ),
        ]
        if streams is not None and streams < watch.GOAL_STREAMS:
            # Latency and memory at fewer streams than the goal say nothing of the goal's.
            watch_checks[kind] = [
                watch_checks[kind][0],
                *(_check(label, text, None) for label, text, _, _ in watch_checks[kind][1:]),
            ]
    targets.append(
        _target(
            "watch",
            f"{watch.GOAL_STREAMS:,} WatchDeployment streams on one API process, delivery p99 ≤ raw NATS p99 + "
            f"{watch.GOAL_OVER_NATS_MS:g} ms and ≤ {watch.GOAL_KIB_PER_STREAM:g} KiB of memory per stream, on each "
            "database",
            watch_checks,
        )
    )

    placement_p99 = _get(results, "scheduler", "p99_ms_by_locations", str(placement.GOAL_LOCATIONS))
    explain_p99 = _get(results, "scheduler", "by_locations", str(placement.GOAL_LOCATIONS), "explain_p99_ms")
    cpu_p99 = _get(results, "scheduler", "by_locations", str(placement.GOAL_LOCATIONS), "cpu_p99_ms")
    placement_checks = (
        {
            "-": [
                _at_most(
                    f"placement p99 at {placement.GOAL_LOCATIONS:,} locations",
                    placement_p99,
                    placement.GOAL_P99_MS,
                    f"p99 {placement_p99} ms"
                    + (f" (in cpu time {cpu_p99} ms)" if cpu_p99 is not None else "")
                    + (f"; with its explanation, as the scheduler calls it, {explain_p99} ms" if explain_p99 else ""),
                    " ms",
                )
            ]
        }
        if _get(results, "scheduler") is not None
        else {}
    )
    targets.append(
        _target(
            "placement",
            f"placement p99 ≤ {placement.GOAL_P99_MS:g} ms at {placement.GOAL_LOCATIONS:,} locations (never "
            "overbooking; the ledger's cost not growing with the number of deployments)",
            placement_checks,
        )
    )

    list_checks: dict[str, list[Check]] = {}
    for kind, entry in _by_database(results, "list").items():
        largest, p99 = entry.get("largest_rows"), entry.get("p99_ms")
        goal = entry.get("goal_p99_ms") or listing.GOAL_P99_MS
        list_checks[kind] = [
            _at_least("rows stored", largest, 1_000_000, f"{largest:,} rows" if largest is not None else "", " rows"),
            _at_most("worst query's p99 at the largest table", p99, goal, f"p99 {p99} ms", " ms"),
        ]
        if largest is not None and largest < 1_000_000:
            list_checks[kind][1] = _check(list_checks[kind][1][0], list_checks[kind][1][1], None)
    targets.append(
        _target(
            "list",
            f"List p99 of a 50-row page ≤ {listing.GOAL_P99_MS:g} ms at 1,000,000 stored rows, filters included, on "
            "each database",
            list_checks,
        )
    )

    telemetry_checks: dict[str, list[Check]] = {}
    for kind, entry in _by_database(results, "telemetry").items():
        overhead = entry.get("overhead")
        goal = entry.get("goal_overhead", 0.10)
        text = (
            f"{entry['on']['rps']}/s on vs {entry['off']['rps']}/s off = {entry['ratio_on_to_off']}x "
            f"({overhead:.1%} overhead, {entry['spans_exported']:,} spans exported)"
            if overhead is not None
            else ""
        )
        telemetry_checks[kind] = [
            _check("overhead", text, None if overhead is None else overhead < goal, f"{overhead:.1%}, over {goal:.0%}")
            if overhead is not None
            else _check("overhead", "", None)
        ]
    targets.append(
        _target(
            "telemetry",
            "metrics and tracing on (scraped, exported over OTLP) cost < 10% of Create throughput at "
            "concurrency 32 (issue 14), on each database",
            telemetry_checks,
        )
    )
    return targets


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_create, ax_place), (ax_list, ax_watch) = axes

    levels = _get(results, "create", "by_concurrency") or {}
    if levels:
        xs = [int(c) for c in levels]
        ax_create.plot(xs, [levels[c]["echo"]["rps"] for c in levels], "o--", label="echo ceiling")
        ax_create.plot(xs, [levels[c]["create"]["rps"] for c in levels], "o-", label="Create")
        ax_create.set_xscale("log", base=2)
        ax_create.set_yscale("log")
        ax_create.legend()
    ax_create.set_title("Create throughput vs concurrency")
    ax_create.set_xlabel("concurrent clients")
    ax_create.set_ylabel("requests/s")

    placement = _get(results, "scheduler", "by_locations") or {}
    if placement:
        xs = [int(n) for n in placement]
        ax_place.plot(xs, [placement[n]["p50_ms"] for n in placement], "o-", label="p50")
        ax_place.plot(xs, [placement[n]["p99_ms"] for n in placement], "o-", label="p99")
        ax_place.axhline(1.0, color="grey", linestyle=":", label="target at 1,000: 1 ms")
        ax_place.set_xscale("log")
        ax_place.set_yscale("log")
        ax_place.legend()
    ax_place.set_title("Placement time vs locations")
    ax_place.set_xlabel("locations in the region")
    ax_place.set_ylabel("ms per placement")

    by_rows = _get(results, "list", "by_rows") or {}
    if by_rows:
        xs = [by_rows[r]["rows"] for r in by_rows]
        names = next(iter(by_rows.values()))["queries"].keys()
        for name in names:
            ax_list.plot(xs, [by_rows[r]["queries"][name]["p99_ms"] for r in by_rows], "o-", label=f"{name} p99")
        ax_list.set_xscale("log")
        ax_list.set_yscale("log")
        ax_list.legend(fontsize="small")
    ax_list.set_title("List page latency vs stored deployments")
    ax_list.set_xlabel("rows in deployments")
    ax_list.set_ylabel("ms per page (50 rows)")

    by_streams = _get(results, "watch", "by_streams") or {}
    if by_streams:
        xs = [by_streams[n]["streams"] for n in by_streams]
        ax_watch.plot(xs, [by_streams[n]["delivery"]["p50_ms"] for n in by_streams], "o-", label="delivery p50")
        ax_watch.plot(xs, [by_streams[n]["delivery"]["p99_ms"] for n in by_streams], "o-", label="delivery p99")
        ax_watch.plot(xs, [by_streams[n]["nats_pub_sub"]["p99_ms"] for n in by_streams], "o--", label="raw NATS p99")
        ax_watch.set_xscale("log")
        ax_watch.set_yscale("log")
        ax_watch.legend()
    ax_watch.set_title("Status event → watch client latency vs open streams")
    ax_watch.set_xlabel("open WatchDeployment streams")
    ax_watch.set_ylabel("ms")

    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"apphosting benchmark, {results.get('started_at', '')} ({results['machine']['cpus']} cpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _cpu_table(runs: list[tuple[Any, ...]], cpus: int, item: str, leading: tuple[str, ...]) -> list[str]:
    """CPU per item of work by process (`runs`: the row's leading cells, then the cost by process), and
    the rate the machine's cores allow at that cost; `leading` names the leading cells."""
    if not runs:
        return []
    kinds = [kind for kind in runs[0][-1] if kind != "total"]
    lines = [
        "",
        f"CPU time per {item}, in ms, by process (user and system time from /proc over "
        "the stage; the database server's own is not counted). At full use of all "
        f"{cpus} cores, the total allows at most {cpus} * 1000 / total per second.",
        "",
        _row(*leading, *kinds, "total", "at most /s"),
        _row(*["---"] * (len(leading) + len(kinds) + 2)),
    ]
    for *cells, cpu in runs:
        total = cpu.get("total") or 0
        ceiling = round(cpus * 1000 / total, 1) if total else None
        lines.append(_row(*cells, *(cpu.get(name) for name in kinds), total, ceiling))
    return lines


def _pipeline_cpu(by_database: dict[str, Any], cpus: int) -> list[str]:
    """The pipeline's CPU per deployment by process, and the rate the machine's cores allow at that cost."""
    runs = [
        (kind, count, entry["cpu_ms_per_deployment"])
        for kind, by_kind in by_database.items()
        for count, entry in (by_kind.get("by_provisioners") or {}).items()
        if entry.get("cpu_ms_per_deployment")
    ]
    return _cpu_table(runs, cpus, "deployment brought to `running`", ("database", "provisioners"))


def _update_cpu(by_database: dict[str, Any], cpus: int) -> list[str]:
    """The updates' CPU per update that got healthy by process, and the rate the cores allow at that cost."""
    runs = [(kind, entry["cpu_ms_per_update"]) for kind, entry in by_database.items() if entry.get("cpu_ms_per_update")]
    return _cpu_table(runs, cpus, "update that got healthy", ("database",))


def _row(*cells: Any) -> str:
    return "| " + " | ".join("—" if cell is None else str(cell) for cell in cells) + " |"


def write_report(results: dict[str, Any], path: Path) -> None:
    """Writes the Markdown report and, beside it, the PNG chart `<stem>.png`."""
    chart = path.with_suffix(".png")
    _chart(results, chart)
    targets = evaluate(results)
    machine = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Produced by `python -m bench --output docs/benchmarks.json --report docs/benchmarks.md` "
        f"({'quick' if results.get('quick') else 'full'} run of {results.get('duration_s')} s, started "
        f"{results.get('started_at')}) on a {machine['cpus']}-cpu machine shared with other work "
        f"(load average at start {machine['load_average_at_start']}), Python {machine['python']}. "
        "The machine is noisy: compare ratios to the ceilings measured in the same run, not absolute numbers "
        "across runs. Every server is a separate process (the API as `apphosting api`, the echo ceiling as "
        "`python -m bench.echo`), so the client and the server under test do not share an event loop or a GIL; "
        "with two cores, the client and the server each get about one. Every stage but placement runs once "
        f"per database ({', '.join(results.get('databases') or ['sqlite'])}), each run on a fresh database (a "
        "PostgreSQL one dropped after) with its ceiling measured in the same run; a target is met when it is "
        "met on each.",
        "",
        "## Targets of issue 12",
        "",
        _row("target", "goal", "measured", "verdict"),
        _row("---", "---", "---", "---"),
    ]
    for target in targets:
        lines.append(_row(target["name"], target["goal"], target["measured"], target["verdict"]))
    lines += ["", f"![how cost grows]({chart.name})", ""]
    lines += [
        "## What holds each one back",
        "",
        "Written from this run's figures: each check a target missed, then what its goal needs that this run did "
        "not measure. The profile notes after them are kept with the code (bench/report.py) by whoever profiled; "
        "they say where the time goes, never whether a target is met.",
        "",
    ]
    for target in targets:
        if target["met"]:
            summary = "met on every database measured."
        elif target["met"] is False:
            summary = "not met."
        elif target["unmeasured"]:
            summary = "not known from this run."
        else:
            summary = "not measured in this run."
        lines.append(f"**{target['name']}** — {summary}")
        lines += [f"- held back by {item}" for item in target["held_back"]]
        if target["unmeasured"]:
            lines.append("- not measured in this run: " + ", ".join(target["unmeasured"]))
        if target["finding"]:
            lines += ["", f"Profile notes: {target['finding']}"]
        lines.append("")

    nats = _get(results, "ceilings", "nats") or {}
    if nats:
        lines += ["## Ceilings", "", _row("path", "p50 ms", "p99 ms", "samples"), _row("---", "---", "---", "---")]
        for name, label in (
            ("pub_sub", "NATS core publish → subscriber"),
            ("request_reply", "NATS core request → reply"),
            ("jetstream_publish", "JetStream publish → ack (file store)"),
        ):
            entry = nats.get(name, {})
            lines.append(_row(label, entry.get("p50_ms"), entry.get("p99_ms"), entry.get("count")))
        lines.append("")

    create_by_database = _by_database(results, "create")
    if create_by_database:
        lines += [
            "## Create",
            "",
            "Closed loop over one channel; the echo ceiling answers the same RPC with canned bytes, measured "
            "right before each Create run at the same concurrency, on each database's own run. Records go to "
            "the database with the outbox relay publishing to JetStream (no scheduler, so nothing else runs). "
            "`p50 ratio` is Create's p50 over the echo's at the same concurrency (issue 12: ≤ 2x at 1).",
            "",
            _row(
                "database",
                "concurrency",
                "Create/s",
                "p50 ms",
                "p99 ms",
                "echo/s",
                "echo p50 ms",
                "echo p99 ms",
                "ratio",
                "p50 ratio",
                "errors",
            ),
            _row(*["---"] * 11),
        ]
        for kind, by_kind in create_by_database.items():
            for concurrency, entry in (by_kind.get("by_concurrency") or {}).items():
                create_p50, echo_p50 = entry["create"]["p50_ms"], entry["echo"]["p50_ms"]
                lines.append(
                    _row(
                        kind,
                        concurrency,
                        entry["create"]["rps"],
                        create_p50,
                        entry["create"]["p99_ms"],
                        entry["echo"]["rps"],
                        echo_p50,
                        entry["echo"]["p99_ms"],
                        entry["ratio_to_echo"],
                        round(create_p50 / echo_p50, 2) if create_p50 and echo_p50 else None,
                        entry["create"]["errors"],
                    )
                )
        for note in _get(results, "create", "notes") or []:
            lines += ["", f"Note: {note}."]
        lines.append("")

    pipeline_by_database = _by_database(results, "pipeline")
    if pipeline_by_database:
        lines += [
            "## Pipeline",
            "",
            "API + scheduler + N `apphosting provisioner --simulate-delay 0` processes serving the same four "
            "locations (so they share the consumers), one nats-server, on each database (a fresh one per run). "
            f"Deployments are created at concurrency {results['plan']['pipeline_concurrency']}; a deployment "
            "counts when the API announces it `running`. Rate = deployments running ÷ time from the first Create "
            "to the last `running`; the ratio is to the goal of 200/s.",
            "",
            _row(
                "database",
                "provisioners",
                "created",
                "running",
                "failed",
                "per second",
                "ratio to goal",
                "create→running p50 ms",
                "p99 ms",
            ),
            _row(*["---"] * 9),
        ]
        for kind, by_kind in pipeline_by_database.items():
            for count, entry in (by_kind.get("by_provisioners") or {}).items():
                lines.append(
                    _row(
                        kind,
                        count,
                        entry["created"],
                        entry["running"],
                        entry["failed"],
                        entry["per_second"],
                        entry.get("ratio_to_goal"),
                        entry["create_to_running"]["p50_ms"],
                        entry["create_to_running"]["p99_ms"],
                    )
                )
        lines += _pipeline_cpu(pipeline_by_database, results["machine"]["cpus"])
        offered_runs = {
            kind: by_kind["offered"] for kind, by_kind in pipeline_by_database.items() if "offered" in by_kind
        }
        if offered_runs:
            lines += [
                "",
                f"Offered {pipeline.OFFERED_PER_SECOND:g} Creates/s (an open loop: each sent at its moment whatever "
                "the answers), latency from that moment to `running`; a deployment not running when the run ended "
                "counts as the whole wait, so an incomplete run's percentiles are lower bounds.",
                "",
                _row("database", "provisioners", "offered", "running", "failed", "complete", "p50 ms", "p99 ms"),
                _row(*["---"] * 8),
            ]
            for kind, entry in offered_runs.items():
                lines.append(
                    _row(
                        kind,
                        entry["provisioners"],
                        entry["offered"],
                        entry["running"],
                        entry["failed"],
                        "yes" if entry["complete"] else "no",
                        entry["create_to_running"]["p50_ms"],
                        entry["create_to_running"]["p99_ms"],
                    )
                )
        for note in _get(results, "pipeline", "notes") or []:
            lines += ["", f"Note: {note}."]
        lines.append("")

    by_database = _get(results, "update", "by_database") or {}
    if by_database:
        plan = results["plan"]
        lines += [
            "## Image updates",
            "",
            f"The pipeline's processes ({plan['update_provisioners']} simulated provisioners at zero delay, sharing "
            "their simulated clusters through `--simulate-state`), on each database. "
            f"{plan['update_deployments']} deployments are created and waited for until `running` and healthy; "
            "then each gets one `UpdateDeployment` (mask `docker_image`, a new tag each) from "
            f"{plan['update_concurrency']} closed-loop clients. An update counts when one `WatchDeployments` "
            "stream shows the deployment with `healthy_release` at the release the update made and `reconciling` "
            "false. Rate = updates healthy ÷ time from the first Update call to the last healthy; latency is from "
            "the Update call to that change on the stream. The ratio is to the goal of "
            f"{_get(results, 'update', 'goal_per_second') or 200.0:.0f}/s; `Update/s` is how fast the API "
            "accepted the calls, the most the rate could reach.",
            "",
            _row(
                "database",
                "running",
                "updated",
                "healthy",
                "rolled back",
                "per second",
                "ratio to goal",
                "update→healthy p50 ms",
                "p99 ms",
                "Update/s",
                "Update call p99 ms",
            ),
            _row(*["---"] * 11),
        ]
        for kind, entry in by_database.items():
            lines.append(
                _row(
                    kind,
                    entry["running"],
                    entry["updates"],
                    entry["healthy"],
                    entry["rolled_back"],
                    entry["per_second"],
                    entry["ratio_to_goal"],
                    entry["update_to_healthy"]["p50_ms"],
                    entry["update_to_healthy"]["p99_ms"],
                    entry["update_rps"],
                    entry["update_call"]["p99_ms"],
                )
            )
        lines += _update_cpu(by_database, results["machine"]["cpus"])
        for note in _get(results, "update", "notes") or []:
            lines += ["", f"Note: {note}."]
        lines.append("")

    watch_by_database = _by_database(results, "watch")
    if watch_by_database:
        per_deployment = next(iter(watch_by_database.values())).get("streams_per_deployment")
        lines += [
            "## Watches",
            "",
            f"WatchDeployment streams on one API process, {per_deployment} per "
            "deployment, from the benchmark process over channels of up to 1,000 streams, on each database. The "
            f"benchmark publishes {results['plan']['watch_events']} `provisioning` status events to JetStream "
            f"(`apphosting.events.<id>`, {results['plan']['watch_rate']:.0f}/s) round robin over the watched "
            "deployments; latency is from the publish call to the arrival at each stream, so it includes the "
            "API applying the event to the database. Raw NATS (the ceiling) is core publish → subscriber at the "
            "same pace, measured right after; `over NATS` is delivery p99 minus it. KiB per stream is the API's "
            "RSS growth over the streams opened; at a few hundred streams it is within the allocator's noise.",
            "",
            _row(
                "database",
                "streams",
                "opened in s",
                "delivered",
                "p50 ms",
                "p99 ms",
                "raw NATS p99 ms",
                "over NATS ms",
                "API RSS MiB",
                "KiB per stream",
            ),
            _row(*["---"] * 10),
        ]
        for kind, by_kind in watch_by_database.items():
            for entry in (by_kind.get("by_streams") or {}).values():
                p99, nats_p99 = entry["delivery"]["p99_ms"], entry["nats_pub_sub"]["p99_ms"]
                lines.append(
                    _row(
                        kind,
                        entry["streams"],
                        entry["open_seconds"],
                        f"{entry['deliveries']}/{entry['deliveries_expected']}",
                        entry["delivery"]["p50_ms"],
                        p99,
                        nats_p99,
                        round(p99 - nats_p99, 1) if p99 is not None and nats_p99 is not None else None,
                        entry["api_rss_mb"],
                        entry["kib_per_stream"],
                    )
                )
        for note in _get(results, "watch", "notes") or []:
            lines += ["", f"Note: {note}."]
        lines.append("")

    placement = _get(results, "scheduler", "by_locations") or {}
    if placement:
        lines += [
            "## Placement",
            "",
            "`scheduler.placement.Placer.place` in the benchmark process, all locations in one region, two "
            "thirds of them holding reservations, 1 in 20 unhealthy, given the `Usage` (per-location arrays) the "
            "scheduler's ledger builds. The index is built once per fleet. `cpu p99` is the same calls in the "
            "thread's cpu time: where it is far below the wall-clock p99, the tail is the process waiting for a "
            "core on a loaded machine, not placement. `explain` is the call the ledger makes for each placement: "
            "the same choice with the 20 best candidates and why the others lost.",
            "",
            _row(
                "locations",
                "p50 ms",
                "p99 ms",
                "max ms",
                "cpu p99 ms",
                "calls",
                "explain p50 ms",
                "explain p99 ms",
                "index build ms",
            ),
            _row(*["---"] * 9),
        ]
        for size, entry in placement.items():
            lines.append(
                _row(
                    size,
                    entry["p50_ms"],
                    entry["p99_ms"],
                    entry["max_ms"],
                    entry.get("cpu_p99_ms"),
                    entry["count"],
                    entry.get("explain_p50_ms"),
                    entry.get("explain_p99_ms"),
                    entry["index_build_ms"],
                )
            )
        lines.append("")

    list_by_database = _by_database(results, "list")
    if list_by_database:
        names = list(next(iter(next(iter(list_by_database.values()))["by_rows"].values()))["queries"])
        lines += [
            "## List",
            "",
            "Rows bulk-inserted into the `deployments` table of the API's database while the API runs (SQLite: "
            "SQLAlchemy executemany into its file; PostgreSQL: binary COPY through asyncpg, then ANALYZE); pages "
            "of 50, one request at a time. `middle_page` resumes from a token in the middle of the table, "
            "`status_failed` filters on a status 1 in 100 rows have, `region_asia` on a region 1 in 10 have. "
            "Cells are p99 ms; the ratio is the worst query's p99 to issue 12's goal of 5 ms.",
            "",
            _row("database", "rows", "inserted in s", *names, "ratio to 5 ms", "API RSS MiB"),
            _row(*["---"] * (len(names) + 5)),
        ]
        for kind, by_kind in list_by_database.items():
            for entry in (by_kind.get("by_rows") or {}).values():
                lines.append(
                    _row(
                        kind,
                        f"{entry['rows']:,}",
                        entry["insert_seconds"],
                        *[entry["queries"][name]["p99_ms"] for name in names],
                        entry.get("ratio_to_goal"),
                        entry["api_rss_mb"],
                    )
                )
        lines.append("")
        for kind, by_kind in list_by_database.items():
            largest = max((entry["rows"] for entry in (by_kind.get("by_rows") or {}).values()), default=0)
            lines.append(
                f"Largest table on {kind}: {largest:,} rows"
                + (f" ({by_kind['insert_method']})" if by_kind.get("insert_method") else "")
                + "."
                + "".join(f" {note}." for note in by_kind.get("notes") or [])
            )
        for note in _get(results, "list", "notes") or []:
            if not any(note in (entry.get("notes") or []) for entry in list_by_database.values()):
                lines += ["", f"Note: {note}."]
        lines.append("")

    telemetry_by_database = _by_database(results, "telemetry")
    if telemetry_by_database:
        lines += [
            "## Telemetry overhead (issue 14)",
            "",
            "Create at concurrency 32 against two API processes side by side, each with its own fresh database "
            "and nats-server, measured in alternation (off, on, on, off, ...) so the machine's load falls on "
            "both alike. *Off*: started as in production (no `--metrics-listen`, no `OTEL_*`; the in-process "
            "counters still run, the product has no switch for them). *On*: `--metrics-listen`, /metrics "
            "scraped every second, and `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/gRPC receiver in its "
            "own process (`python -m bench.otlp`) that accepts every export, batches sent every 0.5 s. The "
            "goal is an overhead under 10%.",
            "",
            _row(
                "database",
                "off Create/s",
                "on Create/s",
                "ratio on/off",
                "overhead",
                "off p99 ms",
                "on p99 ms",
                "off API CPU ms/Create",
                "on API CPU ms/Create",
                "spans exported",
                "scrapes",
                "rounds off",
                "rounds on",
            ),
            _row(*["---"] * 13),
        ]
        for kind, entry in telemetry_by_database.items():
            overhead = entry.get("overhead")
            lines.append(
                _row(
                    kind,
                    entry["off"]["rps"],
                    entry["on"]["rps"],
                    entry["ratio_on_to_off"],
                    None if overhead is None else f"{overhead:.1%}",
                    entry["off"]["p99_ms"],
                    entry["on"]["p99_ms"],
                    entry["off"].get("api_cpu_ms_per_create"),
                    entry["on"].get("api_cpu_ms_per_create"),
                    entry["spans_exported"],
                    entry["scrapes"],
                    ", ".join(str(x) for x in entry["off"]["rounds_rps"]),
                    ", ".join(str(x) for x in entry["on"]["rounds_rps"]),
                )
            )
        for note in _get(results, "telemetry", "notes") or []:
            lines += ["", f"Note: {note}."]
        lines.append("")

    memory = _get(results, "memory", "peak_rss_mb") or {}
    if memory:
        lines += ["## Peak memory (MiB, VmHWM)", "", _row("stage", "process", "peak RSS"), _row("---", "---", "---")]
        for stage, processes in memory.items():
            for process, peak in processes.items():
                lines.append(_row(stage, process, peak))
        lines.append("")
    path.write_text("\n".join(lines))
