#!/usr/bin/env python3
"""scripts/vm/insn-report.py COUNTS CONSOLE IOS [GUEST=HOST ...]

Guest instructions per I/O, by binary and by symbol, with the translation blocks run and those
left by an indirect branch, from scripts/vm/insn-count.c's counts and the executable mappings
the guest printed (between `=== MAPS` and `=== END MAPS` on its console: lines of
/proc/PID/maps). GUEST=HOST maps a guest path to the host file holding its symbols (for
binaries the payload copied stripped of debug info). A block's last instruction is read from
one `objdump -d` of that file; only blocks of the profiled process run at least 0.005 times per
I/O are looked up (the rest add little), and none in the kernel or other processes ("-").
Blocks in the kernel, or in user memory outside the printed mappings (other processes: the
boot, the shell), are summed apart.
Symbols come from `nm` (static, then dynamic table), names from `c++filt`.

With INSN_ANNOTATE=REGEX in the environment, the blocks of every symbol whose demangled name
matches REGEX are listed too: each block's file address (as `objdump -d` shows it), its
instructions, and how often it ran per I/O, so a symbol's cost can be read against its
disassembly (`objdump -d --start-address=A --stop-address=B FILE`).
"""
import os
import re
import bisect
import collections
import subprocess
import sys


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    counts, console, ios = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if ios <= 0:
        sys.exit("insn-report: the run did no I/O")
    host_of = dict(a.split("=", 1) for a in sys.argv[4:])
    maps, inside = [], False
    for line in open(console, errors="replace"):
        line = line.strip()
        if line.startswith("=== MAPS"):
            inside = True
        elif line.startswith("=== END MAPS"):
            inside = False
        elif inside:
            f = line.split()
            if len(f) >= 6 and f[1].startswith("r-x"):
                lo, hi = (int(x, 16) for x in f[0].split("-"))
                maps.append((lo, hi, int(f[2], 16), f[5]))
    if not maps:
        sys.exit("insn-report: no mappings on the console (the program ended before they were read?)")
    maps.sort()
    starts = [m[0] for m in maps]
    tables = {}

    def table(path):
        if path not in tables:
            host = host_of.get(path, path)
            segs = []
            out = subprocess.run(["readelf", "-lW", host], capture_output=True, text=True).stdout
            for l in out.splitlines():
                f = l.split()
                if f and f[0] == "LOAD":
                    segs.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
            syms = {}
            for extra in ([], ["-D"]):
                out = subprocess.run(["nm", "-n", "--defined-only", *extra, host],
                                     capture_output=True, text=True).stdout
                for l in out.splitlines():
                    f = l.split(maxsplit=2)
                    if len(f) == 3 and f[1] in "tTwW":
                        syms.setdefault(int(f[0], 16), f[2])
            addrs = sorted(syms)
            tables[path] = (segs, addrs, [syms[a] for a in addrs])
        return tables[path]

    disasm = {}

    def last_insn(path, elf, n):
        """The mnemonic and operands of block (elf, n)'s last instruction, from one `objdump -d`
        of the binary (indexed once); None when not found."""
        if path not in disasm:
            host = host_of.get(path, path)
            out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", host],
                                 capture_output=True, text=True).stdout
            addrs, texts = [], []
            for l in out.splitlines():
                m = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", l)
                if m:
                    addrs.append(int(m.group(1), 16))
                    texts.append(m.group(2).strip())
            disasm[path] = (addrs, texts)
        addrs, texts = disasm[path]
        k = bisect.bisect_left(addrs, elf)
        if k >= len(addrs) or addrs[k] != elf or k + n - 1 >= len(addrs):
            return None
        return texts[k + n - 1]

    def indirect(text):
        """Whether an instruction leaves its block by a target TCG must look up at run time (a
        return, or a call or jump through a register or memory), rather than by a chained
        direct jump."""
        words = (text or "").split()
        if not words:
            return False
        op = words[0]
        if op.startswith("ret"):
            return True
        return op.startswith(("call", "jmp", "notrack")) and "*" in text

    by_bin, by_sym, calls = collections.Counter(), collections.Counter(), collections.Counter()
    runs_bin, runs_sym = collections.Counter(), collections.Counter()
    ind_bin, ind_sym = collections.Counter(), collections.Counter()
    blocks = collections.defaultdict(collections.Counter)  # key -> {(elf addr, insns): runs}
    total = total_runs = 0
    for line in open(counts):
        v, n, c = line.split()
        v, n, c = int(v, 16), int(n), int(c)
        total += n * c
        total_runs += c
        if v >= 0xFFFF800000000000:
            by_bin["[kernel]"] += n * c
            runs_bin["[kernel]"] += c
            continue
        i = bisect.bisect_right(starts, v) - 1
        if i < 0 or v >= maps[i][1]:
            by_bin["[user, outside the profiled process]"] += n * c
            runs_bin["[user, outside the profiled process]"] += c
            continue
        lo, _, off, path = maps[i]
        by_bin[path] += n * c
        runs_bin[path] += c
        segs, addrs, names = table(path)
        elf = fo = v - lo + off
        for so, sv, sz in segs:
            if so <= fo < so + sz:
                elf = fo - so + sv
                break
        j = bisect.bisect_right(addrs, elf) - 1
        key = (path.rsplit("/", 1)[-1], names[j] if j >= 0 else "?")
        by_sym[key] += n * c
        runs_sym[key] += c
        if c >= ios * 0.005 and indirect(last_insn(path, elf, n)):
            ind_bin[path] += c
            ind_sym[key] += c
        if j >= 0 and addrs[j] == elf:
            calls[key] += c  # a block starting at the symbol: one call
        blocks[key][(elf, n)] += c
    print(f"guest instructions: {total:,} in all, {ios:,.0f} I/Os; "
          f"translation blocks run: {total_runs:,}")
    print("per I/O, by binary (instructions, blocks run, blocks left by an indirect branch; "
          "the kernel and other processes include the boot):")
    for k, v in by_bin.most_common(12):
        ind = f"{ind_bin[k] / ios:7,.1f}" if k in tables else f"{'-':>7}"
        print(f"  {v / ios:10,.1f} {runs_bin[k] / ios:8,.1f} {ind}  {k}")
    top = by_sym.most_common(40)
    names = subprocess.run(["c++filt"], input="\n".join(s for (_, s), _ in top),
                           capture_output=True, text=True).stdout.splitlines()
    print("per I/O, by symbol (instructions, blocks run, indirect exits, calls):")
    for ((b, s), v), d in zip(top, names):
        c = calls.get((b, s), 0) / ios
        r = runs_sym[(b, s)] / ios
        x = ind_sym[(b, s)] / ios
        print(f"  {v / ios:10,.1f} {r:8,.1f} {x:6,.1f} {c:7.2f}  {b}: {d[:100]}")
    pattern = os.environ.get("INSN_ANNOTATE")
    if pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            sys.exit(f"insn-report: INSN_ANNOTATE={pattern!r} is not a regular expression: {e}")
        keys = list(blocks)
        names = subprocess.run(["c++filt"], input="\n".join(s for _, s in keys),
                               capture_output=True, text=True).stdout.splitlines()
        for key, d in zip(keys, names):
            if not re.search(pattern, d):
                continue
            print(f"blocks of {key[0]}: {d[:120]} (address, instructions, runs per I/O, "
                  "instructions per I/O)")
            for (a, n), c in sorted(blocks[key].items()):
                if c / ios >= 0.005:
                    print(f"  {a:#x} {n:4d} {c / ios:8.3f} {n * c / ios:9.1f}")


if __name__ == "__main__":
    main()
