"""A byte relay between two stream endpoints: how the tests reach the test cluster's API server.

The cluster's node lives in a network namespace with no link to the machine's own network (no veth
to the host, no route out): nothing it sends can leave the machine.  Its API server is reached through
a Unix socket, which crosses network namespaces because it is a file: one relay inside the namespace
(``unix:SOCK`` -> ``tcp:NODE_IP:6443``), one outside (``tcp:127.0.0.1:PORT`` -> ``unix:SOCK``).
kubectl, helm and the Python client then use ``https://127.0.0.1:PORT``; TLS, exec, logs -f and
port-forward pass through untouched.

    python -m dpe_devkit.testbed.relay LISTEN TARGET     e.g. tcp:127.0.0.1:0 unix:/tmp/x/api.sock

Prints ``listening ADDRESS`` once it accepts connections; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading


def _endpoint(spec: str) -> tuple[int, object]:
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return socket.AF_INET, (host, int(port))
    raise SystemExit(f"relay: bad endpoint {spec!r} (tcp:HOST:PORT or unix:PATH)")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _serve(client: socket.socket, target: tuple[int, object]) -> None:
    family, addr = target
    upstream = socket.socket(family, socket.SOCK_STREAM)
    try:
        upstream.connect(addr)
    except OSError:
        client.close()
        upstream.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    (lfamily, laddr), target = _endpoint(args[0]), _endpoint(args[1])
    server = socket.socket(lfamily, socket.SOCK_STREAM)
    if lfamily == socket.AF_UNIX:
        try:
            os.unlink(str(laddr))
        except FileNotFoundError:
            pass
    else:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(laddr)
    server.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    where = server.getsockname()
    print(f"listening {where if isinstance(where, str) else f'{where[0]}:{where[1]}'}", flush=True)
    try:
        while True:
            client, _ = server.accept()
            threading.Thread(target=_serve, args=(client, target), daemon=True).start()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
