"""What crossed each cut for one generate request: its line in the access log.

A split engine records every carried tensor as a :class:`~.split_engine.Hop` (the whole
batch's rows). Each request's sequence also sums its own share, per stage and phase, into one
dict on the request's ``CallContext.hops`` (the list the access log reads when the request
or its stream ends), so the request's line says, for example::

    "stage_hops": [{"stage": 1, "phase": "prefill", "calls": 1, "positions": 9,
                    "bytes": 2304, "wire_sent": 3020, "wire_received": 1694, "batch_rows": 1},
                   {"stage": 1, "phase": "decode", "calls": 15, "positions": 15,
                    "bytes": 3840, "wire_sent": 13890, "wire_received": 25380,
                    "batch_rows": 21}]

``bytes``: this request's rows of the carried tensors (positions x width x dtype size);
``wire_sent`` / ``wire_received``: its share of the whole requests and answers a remote stage
exchanged (a call's bytes divided by its rows: framing included; 0 in process);
``batch_rows``: the rows of the calls it took part in (batching). Never a payload.
"""

from __future__ import annotations

from runtime import current_call

PHASES = ("prefill", "decode")


def attach(seq, version) -> None:
    """In the request's thread, before the engine runs ``seq``: its hops go to this request's
    record, and the record names the version that serves it."""
    call = current_call()
    if call is None:
        return
    if call.version is None:  # generate routes: the version that ran, for the audit event
        call.version = str(version)
    seq.stage_hops = {"hops": call.hops}


def tally(seqs, hop) -> None:
    """Add one step's hop to every sequence in it that has a request record."""
    rows = hop.rows or 1
    share = (hop.nbytes // rows, hop.wire_sent // rows, hop.wire_received // rows)
    key = (hop.stage, hop.phase)
    for seq in seqs:
        record = getattr(seq, "stage_hops", None)
        if record is None:
            continue
        entry = record.get(key)
        if entry is None:
            entry = record[key] = {"stage": hop.stage, "phase": hop.phase, "calls": 0,
                                   "positions": 0, "bytes": 0, "wire_sent": 0,
                                   "wire_received": 0, "batch_rows": 0}
            record["hops"].append(entry)  # the request's CallContext.hops
        entry["calls"] += 1
        entry["positions"] += hop.tokens
        entry["bytes"] += share[0]
        entry["wire_sent"] += share[1]
        entry["wire_received"] += share[2]
        entry["batch_rows"] += hop.rows
