#!/usr/bin/env python3
"""One device flooding the gateway with QoS 0 publishes of 200 KB (issue 13's flood).

Usage: flood-qos0.py PORT GATEWAY_PID SECONDS

Connects to 127.0.0.1:PORT as MQTT 3.1.1 client "flood", publishes QoS 0 to
telemetry/flood/x as fast as the socket takes them for SECONDS, and prints how many were sent
and the gateway's peak resident memory (VmRSS of GATEWAY_PID, sampled every 50 ms).
"""
import socket
import sys
import threading
import time


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def remaining_length(n):
    out = b""
    while True:
        digit, n = n % 128, n // 128
        out += bytes([digit | 0x80 if n else digit])
        if not n:
            return out


def main():
    port, pid, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    client_id = b"flood"
    connect = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(client_id).to_bytes(2, "big") + client_id
    topic = b"telemetry/flood/x"
    publish = len(topic).to_bytes(2, "big") + topic + b"x" * 200_000
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"\x10" + remaining_length(len(connect)) + connect)
    if sock.recv(4)[:1] != b"\x20":
        sys.exit("no CONNACK")
    packet = b"\x30" + remaining_length(len(publish)) + publish
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent, start = 0, time.time()
    while time.time() - start < seconds:
        sock.sendall(packet)
        sent += 1
    done.set()
    watcher.join()
    print(
        f"sent {sent} publishes ({sent * 200 / 1000:.0f} MB) in {seconds:.0f} s; "
        f"gateway peak RSS {peak[0] / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
