"""Reading and forging audit logs on disk, for the tests that tamper with real logs:
`tollgate audit …` runs, the canonical form a forger writes, a log's segments and lines."""
import glob
import json
import os
import subprocess

from tollgate_harness import BIN


def run(*args, timeout=60):
    """`tollgate audit ARGS`; errors="replace": a reason may quote a forged record's bytes."""
    return subprocess.run([BIN, "audit", *args], capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def canonical(record):
    """The stream's canonical form (sorted keys, no whitespace), as a forger would write it."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def segments(d):
    return sorted(glob.glob(os.path.join(d, "segment-*.jsonl")))


def segment_text(path):
    """A segment's records as text. The segment being written ends in blanks written ahead
    of its records (audit.prefill): they are not content."""
    with open(path) as f:
        return f.read().rstrip(" ")


def read_lines(d):
    out = []
    for seg in segments(d):
        out += segment_text(seg).splitlines()
    return out


def write_lines(d, lines):
    """The log as one segment holding `lines`."""
    for seg in segments(d):
        os.remove(seg)
    with open(os.path.join(d, "segment-000001.jsonl"), "w") as f:
        f.write("".join(l + "\n" for l in lines))
