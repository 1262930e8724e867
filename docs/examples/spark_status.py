#!/usr/bin/env python3
"""Print each spark worker's name, state and processed count, straight from sparkd's control socket.

Usage: spark_status.py [SOCKET]    (default: $SPARK_SOCKET, else the path sparkd itself would use)
Needs only a stock msgpack library (Debian: python3-msgpack). See docs/protocol.md.
"""
import os
import socket
import sys

import msgpack


def default_socket():
    if os.environ.get("SPARK_SOCKET"):
        return os.environ["SPARK_SOCKET"]
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.environ["RUNTIME_DIRECTORY"].split(":")[0] + "/sparkd.sock"
    if os.geteuid() == 0:
        return "/run/spark/sparkd.sock"
    if os.environ.get("XDG_RUNTIME_DIR", "").startswith("/"):
        return os.environ["XDG_RUNTIME_DIR"] + "/spark/sparkd.sock"
    return f"/tmp/spark-{os.geteuid()}/sparkd.sock"


def call(path, method, params, msgid=1):
    """One msgpack-RPC request; returns the result or raises with the daemon's error code."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(msgpack.packb([0, msgid, method, [params]], use_bin_type=True))
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("sparkd closed the connection")
            unpacker.feed(data)
            for msg in unpacker:
                if msg[0] == 1 and msg[1] == msgid:  # [1, msgid, error, result]
                    if msg[2] is not None:
                        raise RuntimeError(f"{msg[2]['code']}: {msg[2]['message']}")
                    return msg[3]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else default_socket()
    try:
        status = call(path, "status", {"verbose": False})
    except (OSError, RuntimeError) as e:
        sys.exit(f"spark_status: {path}: {e}")
    for w in status["workers"]:
        print(f"{w['name']}\t{w['state']}\tprocessed={w['processed']}")


if __name__ == "__main__":
    main()
