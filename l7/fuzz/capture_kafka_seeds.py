"""Writes the committed seeds of the kafka_request fuzz target: the requests a real client
(kafka-python, driven by l7/tests/kafka_client.py) sends to a real broker (tansu), one file per
(apiKey, apiVersion), each the frame without its size prefix (what the target parses).

    python3 l7/fuzz/capture_kafka_seeds.py   # needs tansu and kafka-python (scripts/setup-l7.sh)
"""
import os
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds", "kafka_request")
CLIENT = os.path.join(HERE, "..", "tests", "kafka_client.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def pipe(src, dst, frames):
    """Copies src to dst; with `frames`, records each request frame on the way."""
    try:
        while True:
            if frames is None:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                continue
            head = read_exact(src, 4)
            if head is None:
                break
            (size,) = struct.unpack(">i", head)
            body = read_exact(src, size)
            if body is None:
                break
            frames.append(body)
            dst.sendall(head + body)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def relay(listener, broker, frames):
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(broker)
        except OSError:
            client.close()
            return
        threading.Thread(target=pipe, args=(client, upstream, frames), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, None), daemon=True).start()


def group_and_admin(bootstrap):
    """Requests the test client does not send: a consumer group's and the admin's."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import ConfigResource, ConfigResourceType

    common = dict(bootstrap_servers=bootstrap, client_id="seed", request_timeout_ms=8000)
    try:
        c = KafkaConsumer("orders", group_id="g1", auto_offset_reset="earliest",
                          consumer_timeout_ms=3000, **common)
        for _ in c:
            break
        c.commit()
        c.close()
    except Exception as e:  # a request the broker refuses is still a seed
        print("group:", type(e).__name__, e)
    try:
        admin = KafkaAdminClient(**common)
        admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "orders")])
        admin.delete_topics(["audit"])
        admin.close()
    except Exception as e:
        print("admin:", type(e).__name__, e)


def main():
    relay_port, broker_port = free_port(), free_port()
    broker = subprocess.Popen(
        [
            "tansu", "broker",
            "--listener-url", f"tcp://127.0.0.1:{broker_port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{relay_port}",
            "--storage-engine", "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    frames = []
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", broker_port)).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("tansu did not start")
                time.sleep(0.05)
        listener = socket.create_server(("127.0.0.1", relay_port))
        threading.Thread(target=relay, args=(listener, ("127.0.0.1", broker_port), frames),
                         daemon=True).start()
        bootstrap = f"127.0.0.1:{relay_port}"
        for args in (["create", "orders", "audit"], ["produce", "orders", "m1"],
                     ["consume", "orders"]):
            out = subprocess.run([sys.executable, CLIENT, args[0], bootstrap, *args[1:]],
                                 capture_output=True, text=True, check=True).stdout.strip()
            print(" ".join(args), "->", out)
        group_and_admin(bootstrap)
        listener.close()
    finally:
        broker.terminate()
        broker.wait()

    os.makedirs(OUT, exist_ok=True)
    seen = set()
    for frame in frames:
        key, version = struct.unpack(">hh", frame[:4])
        if (key, version) in seen:
            continue
        seen.add((key, version))
        with open(os.path.join(OUT, f"key{key}-v{version}"), "wb") as f:
            f.write(frame)
    print(f"{len(seen)} seeds in {OUT}")


main()
