#!/usr/bin/env python3
"""S3 load against a running RustFS (boto3), every byte verified.

Used by scripts/rustfs-e2e; one invocation runs one phase against one server:

  rustfs-load.py --endpoint URL --phase load  --sizes 4k,64k,1m,16m --conc 1,8,32 --out res.json
  rustfs-load.py --endpoint URL --phase check --manifest m.json      # GET + verify what is there

Phase `load`, per (size, concurrency) cell: PUT N objects (N = max(concurrency,
min(max_objects, budget / size))), GET them all warm, drop the page cache (root: write 3 to
/proc/sys/vm/drop_caches after a sync), GET them all cold, LIST the prefix, DELETE half of
them, and keep the rest (written to --manifest, for the fault and restart checks). Each
operation's latency is recorded; a cell reports bytes/s and p50/p99 per operation kind.

Object content is a function of the key (SHA-256 of key and 64 KiB block index, repeated), so
any reader can verify every byte without keeping copies. A mismatch, a missing object, or an
S3 error makes the run fail (exit 1) after printing what went wrong.
"""

import argparse
import concurrent.futures as cf
import hashlib
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

import boto3
import botocore.config

BLOCK = 64 * 1024


def content(key: str, size: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < size:
        seed = hashlib.sha256(f"{key}/{i}".encode()).digest()
        out += seed * (BLOCK // len(seed))
        i += 1
    return bytes(out[:size])


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mul = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if s[-1] in mul:
        return int(s[:-1]) * mul[s[-1]]
    return int(s)


def client(endpoint, access, secret, conc):
    cfg = botocore.config.Config(
        max_pool_connections=max(conc * 2, 10),
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=300,
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=cfg,
    )


def pct(xs, p):
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        print(f"rustfs-load: cannot drop the page cache ({e}); cold reads are warm", file=sys.stderr)
        return False


class Failed(Exception):
    pass


def run_ops(s3, bucket, keys, op, size, conc, verify=True):
    """Run `op` (put/get/delete) on every key with `conc` threads; returns latencies (s)."""

    def one(key):
        t = time.perf_counter()
        if op == "put":
            s3.put_object(Bucket=bucket, Key=key, Body=content(key, size))
        elif op == "get":
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            lat = time.perf_counter() - t
            if verify and body != content(key, size):
                raise Failed(f"GET {key}: {len(body)} bytes, content differs from what was PUT")
            return lat
        elif op == "delete":
            s3.delete_object(Bucket=bucket, Key=key)
        return time.perf_counter() - t

    with cf.ThreadPoolExecutor(max_workers=conc) as ex:
        return list(ex.map(one, keys))


def cell(s3, bucket, size, conc, budget, max_objects, manifest):
    n = max(conc, min(max_objects, max(1, budget // size)))
    prefix = f"c{conc}/s{size}/"
    keys = [f"{prefix}obj-{i:05d}" for i in range(n)]
    res = {"size": size, "conc": conc, "objects": n}
    t = time.perf_counter()
    lat = run_ops(s3, bucket, keys, "put", size, conc)
    res["put"] = summary(lat, n * size, time.perf_counter() - t)
    t = time.perf_counter()
    lat = run_ops(s3, bucket, keys, "get", size, conc)
    res["get_warm"] = summary(lat, n * size, time.perf_counter() - t)
    res["cold_is_cold"] = drop_caches()
    t = time.perf_counter()
    lat = run_ops(s3, bucket, keys, "get", size, conc)
    res["get_cold"] = summary(lat, n * size, time.perf_counter() - t)
    listed = []
    token = None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        listed += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            break
        token = r["NextContinuationToken"]
    if sorted(listed) != keys:
        raise Failed(f"LIST {prefix}: {len(listed)} keys, expected {len(keys)}")
    gone = keys[::2]
    t = time.perf_counter()
    lat = run_ops(s3, bucket, gone, "delete", size, conc)
    res["delete"] = summary(lat, 0, time.perf_counter() - t)
    for k in gone:
        try:
            s3.head_object(Bucket=bucket, Key=k)
            raise Failed(f"{k} still there after DELETE")
        except s3.exceptions.ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                raise
    for k in keys[1::2]:
        manifest[k] = size
    res["verified"] = 2 * n
    return res


def summary(lat, nbytes, wall):
    return {
        "ops": len(lat),
        "bytes": nbytes,
        "wall_s": wall,
        "bytes_per_s": nbytes / wall if wall > 0 else 0.0,
        "ops_per_s": len(lat) / wall if wall > 0 else 0.0,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
    }


class LightGet:
    """GETs at the server's pace: a presigned URL per object (SigV4 query auth, made by boto3:
    still an S3 GET the server authenticates), fetched with `http.client` on one kept-alive
    connection per thread, read with `readinto` into a buffer the thread reuses, and compared
    with the object's content computed once. boto3's own GET allocates, joins and copies every
    body (~1.5x the server's CPU per 16 MiB GET on a 2-core machine), so the client, not the
    server, set the pace of large cold GETs; this one costs a receive and a compare."""

    def __init__(self, s3, bucket, keys, size):
        self.size = size
        self.urls = {
            k: urllib.parse.urlsplit(
                s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": k}, ExpiresIn=3600)
            )
            for k in keys
        }
        self.expected = {k: content(k, size) for k in keys}
        self.local = threading.local()

    def one(self, key):
        u = self.urls[key]
        t = time.perf_counter()
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
                self.local.buf = bytearray(self.size)
            try:
                conn.request("GET", f"{u.path}?{u.query}")
                r = conn.getresponse()
                break
            except (ConnectionError, http.client.HTTPException):
                # A kept-alive connection the server closed: once more on a new one.
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        if r.status != 200:
            raise Failed(f"GET {key}: HTTP {r.status} {r.read()[:200]!r}")
        mv = memoryview(self.local.buf)
        got = 0
        while got < self.size:
            n = r.readinto(mv[got:])
            if not n:
                break
            got += n
        rest = r.read()
        lat = time.perf_counter() - t
        # bytearray == bytes is one memcmp (a memoryview compares element by element).
        if got != self.size or rest or self.local.buf != self.expected[key]:
            raise Failed(f"GET {key}: {got + len(rest)} bytes, content differs from what was PUT")
        return lat


def coldget(s3, bucket, manifest, size, conc, passes, seconds=0.0):
    """`passes` passes of cold GETs (page cache dropped first) of every object of `size`,
    with LightGet (or, with `seconds`, passes until that long has gone by); returns each
    pass's summary."""
    keys = sorted(k for k, sz in manifest.items() if sz == size)
    if not keys:
        raise Failed(f"no object of {size} bytes in the manifest")
    g = LightGet(s3, bucket, keys, size)
    out = []
    start = time.perf_counter()
    while len(out) < passes if not seconds else time.perf_counter() - start < seconds:
        drop_caches()
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(max_workers=conc) as ex:
            lat = list(ex.map(g.one, keys))
        out.append(summary(lat, size * len(keys), time.perf_counter() - t))
    return out


def check(s3, bucket, manifest, conc):
    """GET every object of the manifest and verify it; returns the count."""
    by_size = {}
    for k, size in manifest.items():
        by_size.setdefault(size, []).append(k)
    n = 0
    for size, keys in sorted(by_size.items()):
        run_ops(s3, bucket, keys, "get", size, conc)
        n += len(keys)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--access-key", default="rustfsadmin")
    ap.add_argument("--secret-key", default="rustfsadmin")
    ap.add_argument("--bucket", default="rio-e2e")
    ap.add_argument("--phase", choices=["load", "check", "coldget"], required=True)
    ap.add_argument("--passes", type=int, default=3, help="coldget: passes over the objects")
    ap.add_argument("--seconds", type=float, default=0.0, help="coldget: passes until this long instead")
    ap.add_argument("--sizes", default="4k,64k,1m,16m")
    ap.add_argument("--conc", default="1,8,32")
    ap.add_argument("--budget", default="128m", help="bytes PUT per cell (at least conc objects)")
    ap.add_argument("--max-objects", type=int, default=128)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out")
    a = ap.parse_args()
    conc_max = max(int(c) for c in a.conc.split(","))
    s3 = client(a.endpoint, a.access_key, a.secret_key, conc_max)
    try:
        if a.phase == "load":
            try:
                s3.create_bucket(Bucket=a.bucket)
            except s3.exceptions.ClientError as e:
                if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            manifest = {}
            cells = []
            for size in [parse_size(s) for s in a.sizes.split(",")]:
                for conc in [int(c) for c in a.conc.split(",")]:
                    r = cell(s3, a.bucket, size, conc, parse_size(a.budget), a.max_objects, manifest)
                    cells.append(r)
                    print(
                        f"  size={size} conc={conc} n={r['objects']} "
                        f"put={r['put']['bytes_per_s'] / 2**20:.1f}MiB/s "
                        f"get_warm={r['get_warm']['bytes_per_s'] / 2**20:.1f}MiB/s "
                        f"get_cold={r['get_cold']['bytes_per_s'] / 2**20:.1f}MiB/s "
                        f"p99_cold={r['get_cold']['p99_ms']:.1f}ms",
                        flush=True,
                    )
            with open(a.manifest, "w") as f:
                json.dump(manifest, f)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"cells": cells, "verified": sum(c["verified"] for c in cells)}, f)
        elif a.phase == "coldget":
            with open(a.manifest) as f:
                manifest = json.load(f)
            size = parse_size(a.sizes.split(",")[0])
            passes = coldget(s3, a.bucket, manifest, size, conc_max, a.passes, a.seconds)
            for p in passes:
                print(
                    f"  coldget size={size} conc={conc_max} n={p['ops']} "
                    f"{p['bytes_per_s'] / 2**20:.1f}MiB/s p99={p['p99_ms']:.1f}ms",
                    flush=True,
                )
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"passes": passes}, f)
        else:
            with open(a.manifest) as f:
                manifest = json.load(f)
            n = check(s3, a.bucket, manifest, conc_max)
            print(f"  verified {n} objects")
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"verified": n}, f)
    except Failed as e:
        print(f"rustfs-load: FAILED: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an S3 or connection error: the run failed
        print(f"rustfs-load: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
