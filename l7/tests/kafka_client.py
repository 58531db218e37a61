"""Kafka client for the proxy tests (kafka-python). Prints one line: OK ... or ERR <class> ..."""
import sys

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

COMMON = dict(client_id="fqdnwall-test", request_timeout_ms=8000)


def main():
    mode, bootstrap = sys.argv[1], sys.argv[2]
    try:
        if mode == "create":
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, **COMMON)
            admin.create_topics([NewTopic(t, 1, 1) for t in sys.argv[3:]])
            print("OK")
        elif mode == "produce":
            p = KafkaProducer(bootstrap_servers=bootstrap, max_block_ms=8000, retries=0, **COMMON)
            md = p.send(sys.argv[3], sys.argv[4].encode()).get(timeout=10)
            print("OK", md.offset)
        elif mode == "consume":
            c = KafkaConsumer(
                bootstrap_servers=bootstrap,
                enable_auto_commit=False,
                consumer_timeout_ms=3000,
                **COMMON,
            )
            tp = TopicPartition(sys.argv[3], 0)
            c.assign([tp])
            c.seek_to_beginning(tp)
            print("OK", ",".join(m.value.decode() for m in c))
        else:
            raise SystemExit("unknown mode " + mode)
    except Exception as e:  # the test reads the class name
        print("ERR", type(e).__name__, str(e).replace("\n", " "))


main()
