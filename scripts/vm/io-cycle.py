#!/usr/bin/env python3
"""Where an I/O's time goes in the test VM, from QEMU's NVMe trace events (scripts/vm-io-cycle).

    io-cycle.py TRACE_LOG LABEL...

TRACE_LOG is QEMU's `-trace` log (the `log` backend, `-msg timestamp=on`: lines
`PID@SECONDS.MICROS:EVENT ARGS`) with the events pci_nvme_mmio_doorbell_sq,
pci_nvme_mmio_doorbell_cq, pci_nvme_io_cmd, pci_nvme_enqueue_req_completion and pci_nvme_rw_cb
(the backing file's completions; optional, used by the batch table). Only I/O queue 1 of
controller A's namespace 1 is looked at. The guest ran one program per LABEL, in that order,
with a pause of at least a second between them: the runs are told apart by gaps of more than
300 ms without I/O.

For each run: commands per second while traced (the trace slows the emulator: not a figure to
compare with untraced runs), MMIO doorbell writes per command (SQ tail, CQ head), and the
medians of the I/O cycle's parts, in microseconds:
  wake    SQ doorbell write -> the controller fetches the command (QEMU's SQ timer, then its
          main loop waking up: the emulator's, not the driver's)
  device  fetch -> completion queued (the backing file's read, in the emulator)
  host    completion queued -> the next SQ doorbell write (the CQ timer and the post, then the
          program seeing the completion, handling it and submitting again: the driver's part,
          plus ~1 us of the emulator's)
The parts are measured between consecutive events, so they describe QD1 runs.

At higher depths QEMU's controller works in lock-step batches (it fetches what the SQ holds,
submits it to the backing file, queues the completions, posts them together, and waits), so a
second table splits each batch cycle instead (runs with batches of at least 8 commands), medians
in microseconds:
  guest   last completion queued -> first command fetched of the next batch (the program's
          part, from seeing the posted completions to the doorbell, plus the emulator's wake)
  to_db   last completion queued -> the first SQ doorbell write after it
  wake    that doorbell -> the first fetch
  fetch   first -> last fetch of the batch (the controller reading commands, under QEMU's lock)
  io      last fetch -> first backing-file completion
  post    first backing-file completion -> last completion queued
  cycle   first fetch -> first fetch of the next batch
  cq_sq   CQ head doorbell write -> SQ doorbell write, when a CQ write comes first in the
          guest part: a program that rings its CQ head at the end of a batch of completion
          callbacks, after the first of them already rang the SQ doorbell (SPDK's per-command
          doorbells), meets the controller at work and needs QEMU's lock; such a write, carrying
          the head of the batch before, lands here, after the next batch was posted, and what
          the program does after it (rio bench's accounting) before it polls again lies on the
          cycle's path. With the CQ and SQ written together at the batch's end (spdk_nvme_perf)
          it is a few us
"""
import bisect
import re
import statistics
import sys

LINE = re.compile(r"(\d+)@(\d+)\.(\d+):(\S+) (.*)")
WANT = {
    "pci_nvme_mmio_doorbell_sq": ("dbsq", "sqid 1 "),
    "pci_nvme_mmio_doorbell_cq": ("dbcq", "cqid 1 "),
    "pci_nvme_io_cmd": ("cmd", "sqid 1 "),
    "pci_nvme_enqueue_req_completion": ("enq", "cqid 1 "),
    "pci_nvme_rw_cb": ("io", "'drv-a-ns1'"),
}
GAP_US = 300_000


def events(path):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            _pid, sec, usec, name, args = m.groups()
            w = WANT.get(name)
            if w is None or w[1] not in args + " ":
                continue
            out.append((int(sec) * 1_000_000 + int(usec), w[0]))
    out.sort(key=lambda e: e[0])
    return out


def runs(evs):
    segs, cur = [], []
    for e in evs:
        if cur and e[0] - cur[-1][0] > GAP_US:
            segs.append(cur)
            cur = []
        cur.append(e)
    if cur:
        segs.append(cur)
    # Queue set-up and tear-down make short bursts of their own: a run has many commands.
    return [s for s in segs if sum(1 for e in s if e[1] == "cmd") >= 1000]


def median(values):
    return statistics.median(values) if values else float("nan")


def median_between(seg, a, b):
    """Median time from each event `a` to the event right after it, when that is `b`."""
    return median([y[0] - x[0] for x, y in zip(seg, seg[1:]) if x[1] == a and y[1] == b])


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    labels = sys.argv[2:]
    segs = runs(events(sys.argv[1]))
    # The QD1 parts are measured between adjacent events: without the backing-file completions.
    qd1 = [[e for e in s if e[1] != "io"] for s in segs]
    if len(segs) != len(labels):
        sys.exit(f"io-cycle: {len(segs)} runs in the trace, {len(labels)} expected ({' '.join(labels)})")
    print(f"{'run':<14} {'cmds/s':>8} {'sq_db/cmd':>9} {'cq_db/cmd':>9} {'wake':>6} {'device':>6} {'host':>6} {'cycle':>6}")
    for label, s in zip(labels, qd1):
        n = sum(1 for e in s if e[1] == "cmd")
        secs = (s[-1][0] - s[0][0]) / 1e6
        sq = sum(1 for e in s if e[1] == "dbsq")
        cq = sum(1 for e in s if e[1] == "dbcq")
        wake = median_between(s, "dbsq", "cmd")
        dev = median_between(s, "cmd", "enq")
        # host: from the completion to the next SQ doorbell, a CQ doorbell between them or not
        hs = []
        for i, e in enumerate(s):
            if e[1] != "enq":
                continue
            for f in s[i + 1 : i + 3]:
                if f[1] == "dbsq":
                    hs.append(f[0] - e[0])
                    break
                if f[1] != "dbcq":
                    break
        host = median(hs)
        t = [e[0] for e in s if e[1] == "dbsq"]
        cyc = median([b - a for a, b in zip(t, t[1:])])
        print(f"{label:<14} {n / secs:8.0f} {sq / n:9.3f} {cq / n:9.3f} {wake:6.1f} {dev:6.1f} {host:6.1f} {cyc:6.1f}")
    rows = [(label, batch_cycles(s)) for label, s in zip(labels, segs)]
    rows = [(label, b) for label, b in rows if b is not None]
    if rows:
        print()
        print(f"{'run':<14} {'batches':>7} {'cmds/b':>6} {'guest':>6} {'to_db':>6} {'wake':>6} "
              f"{'fetch':>6} {'io':>6} {'post':>6} {'cycle':>6} {'cq_sq':>6}")
        for label, b in rows:
            print(f"{label:<14} {b['n']:7d} {b['cmds']:6.0f} {b['guest']:6.0f} {b['to_db']:6.0f} "
                  f"{b['wake']:6.0f} {b['fetch']:6.0f} {b['io']:6.0f} {b['post']:6.0f} "
                  f"{b['cycle']:6.0f} {b['cq_sq']:6.0f}")


def batch_cycles(seg):
    """Medians of a lock-step run's batch phases (see the docstring), or None below batches of 8."""
    # Blocks of consecutive fetches and of consecutive backing completions / queued completions.
    # [kind, first time, last time, commands or completions queued, first backing completion]
    blocks = []
    for t, k in seg:
        if k not in ("cmd", "io", "enq"):
            continue
        kind = "cmd" if k == "cmd" else "done"
        if blocks and blocks[-1][0] == kind:
            blocks[-1][2] = t
            blocks[-1][3] += k in ("cmd", "enq")
            if k == "io" and blocks[-1][4] is None:
                blocks[-1][4] = t
        else:
            blocks.append([kind, t, t, int(k in ("cmd", "enq")), t if k == "io" else None])
    doorbells = [(t, k) for t, k in seg if k in ("dbsq", "dbcq")]
    times = [t for t, _ in doorbells]
    keys = ("cmds", "guest", "to_db", "wake", "fetch", "io", "post", "cycle", "cq_sq")
    parts = {k: [] for k in keys}
    for a, b, c in zip(blocks, blocks[1:], blocks[2:]):
        if a[0] != "cmd" or b[0] != "done" or c[0] != "cmd" or a[3] < 8:
            continue
        parts["cmds"].append(a[3])
        parts["fetch"].append(a[2] - a[1])
        parts["io"].append((b[4] if b[4] is not None else b[1]) - a[2])
        parts["post"].append(b[2] - (b[4] if b[4] is not None else b[1]))
        parts["guest"].append(c[1] - b[2])
        parts["cycle"].append(c[1] - a[1])
        i = bisect.bisect_right(times, b[2])
        cq = doorbells[i][0] if i < len(doorbells) and doorbells[i][1] == "dbcq" else None
        while i < len(doorbells) and doorbells[i][0] < c[1] and doorbells[i][1] != "dbsq":
            i += 1
        if i < len(doorbells) and doorbells[i][0] < c[1]:
            parts["to_db"].append(doorbells[i][0] - b[2])
            parts["wake"].append(c[1] - doorbells[i][0])
            if cq is not None:
                parts["cq_sq"].append(doorbells[i][0] - cq)
    n = len(parts["cycle"])
    if n == 0:
        return None
    out = {k: median(v) for k, v in parts.items()}
    out["n"] = n
    return out


if __name__ == "__main__":
    main()
