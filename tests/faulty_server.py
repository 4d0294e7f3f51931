"""A stdio MCP server that misbehaves on cue: the demo server behind a relay.

It offers exactly the demo server's tools (so the demo manifest pins it) and
relays every line both ways, except:

- if the file named by ``FAULTY_REFUSE`` exists when it starts, it exits at
  once, like a server that can no longer start;
- a request whose line contains the text in ``FAULTY_GARBLE`` is not passed
  on: the relay answers it with a line that is not JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

GARBAGE = b"Traceback (most recent call last): this is not JSON-RPC\n"


def pump(source: BinaryIO, sink: BinaryIO, lock: threading.Lock) -> None:
    for line in source:
        with lock:
            sink.write(line)
            sink.flush()


def main() -> int:
    refuse = os.environ.get("FAULTY_REFUSE", "")
    if refuse and Path(refuse).exists():
        return 3
    garble = os.environ.get("FAULTY_GARBLE", "").encode()
    demo = subprocess.Popen(
        [sys.executable, "-m", "broker.demo_server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    if demo.stdin is None or demo.stdout is None:
        return 4
    out, lock = sys.stdout.buffer, threading.Lock()
    threading.Thread(target=pump, args=(demo.stdout, out, lock), daemon=True).start()
    for line in sys.stdin.buffer:
        if garble and garble in line:
            with lock:
                out.write(GARBAGE)
                out.flush()
            continue
        demo.stdin.write(line)
        demo.stdin.flush()
    demo.stdin.close()
    return demo.wait()


if __name__ == "__main__":
    sys.exit(main())
