#!/usr/bin/env python3
"""Where an I/O's time goes in the test VM, from QEMU's NVMe trace events (scripts/vm-io-cycle).

    io-cycle.py TRACE_LOG LABEL...

TRACE_LOG is QEMU's `-trace` log (the `log` backend, `-msg timestamp=on`: lines
`PID@SECONDS.MICROS:EVENT ARGS`) with the events pci_nvme_mmio_doorbell_sq,
pci_nvme_mmio_doorbell_cq, pci_nvme_io_cmd and pci_nvme_enqueue_req_completion. Only I/O queue 1
is looked at. The guest ran one program per LABEL, in that order, with a pause of at least a
second between them: the runs are told apart by gaps of more than 300 ms without I/O.

For each run: commands per second while traced (the trace slows the emulator: not a figure to
compare with untraced runs), MMIO doorbell writes per command (SQ tail, CQ head), and the
medians of the I/O cycle's parts, in microseconds:
  wake    SQ doorbell write -> the controller fetches the command (QEMU's SQ timer, then its
          main loop waking up: the emulator's, not the driver's)
  device  fetch -> completion queued (the backing file's read, in the emulator)
  host    completion queued -> the next SQ doorbell write (the CQ timer and the post, then the
          program seeing the completion, handling it and submitting again: the driver's part,
          plus ~1 us of the emulator's)
The parts are measured between consecutive events, so they describe QD1 runs; at higher depths
only the rates and doorbells per command mean something.
"""
import re
import statistics
import sys

LINE = re.compile(r"(\d+)@(\d+)\.(\d+):(\S+) (.*)")
WANT = {
    "pci_nvme_mmio_doorbell_sq": ("dbsq", "sqid 1 "),
    "pci_nvme_mmio_doorbell_cq": ("dbcq", "cqid 1 "),
    "pci_nvme_io_cmd": ("cmd", "sqid 1 "),
    "pci_nvme_enqueue_req_completion": ("enq", "cqid 1 "),
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
    if len(segs) != len(labels):
        sys.exit(f"io-cycle: {len(segs)} runs in the trace, {len(labels)} expected ({' '.join(labels)})")
    print(f"{'run':<14} {'cmds/s':>8} {'sq_db/cmd':>9} {'cq_db/cmd':>9} {'wake':>6} {'device':>6} {'host':>6} {'cycle':>6}")
    for label, s in zip(labels, segs):
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


if __name__ == "__main__":
    main()
