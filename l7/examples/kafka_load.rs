//! Produce load for the Kafka benchmark: N connections, each keeping a few Produce requests
//! (acks=1, one batch of R records of S bytes to partition 0) in flight for D seconds.
//! Prints records/s, MB/s and errors as one line of JSON.
//!
//!   kafka_load ADDR TOPIC [SECONDS=10] [CONNECTIONS=4] [RECORDS=100] [SIZE=100] [INFLIGHT=8]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

const VERSION: i16 = 7;

fn batch(records: usize, size: usize) -> Bytes {
    let value = Bytes::from(vec![b'v'; size]);
    let recs: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: 0,
            key: None,
            value: Some(value.clone()),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &recs,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode records");
    buf.freeze()
}

fn request(topic: &str, records: &Bytes, corr: i32) -> Bytes {
    let mut h = RequestHeader::default();
    h.request_api_key = ApiKey::Produce as i16;
    h.request_api_version = VERSION;
    h.correlation_id = corr;
    h.client_id = Some(StrBytes::from_static_str("kafka-load"));
    let mut p = ProduceRequest::default();
    p.acks = 1;
    p.timeout_ms = 5000;
    let mut t = TopicProduceData::default();
    t.name = TopicName(StrBytes::from_string(topic.to_string()));
    let mut pd = PartitionProduceData::default();
    pd.index = 0;
    pd.records = Some(records.clone());
    t.partition_data.push(pd);
    p.topic_data.push(t);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0; 4]);
    h.encode(&mut buf, ApiKey::Produce.request_header_version(VERSION))
        .unwrap();
    p.encode(&mut buf, VERSION).unwrap();
    let n = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&n.to_be_bytes());
    buf.freeze()
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = a.get(1).expect("ADDR").parse().expect("ADDR");
    let topic = a.get(2).expect("TOPIC").clone();
    let num = |i: usize, d: u64| a.get(i).map(|s| s.parse().expect("number")).unwrap_or(d);
    let (secs, conns, records, size, inflight) =
        (num(3, 10), num(4, 4), num(5, 100), num(6, 100), num(7, 8));
    let records_batch = batch(records as usize, size as usize);
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (acked, errors, topic, records_batch) = (
            acked.clone(),
            errors.clone(),
            topic.clone(),
            records_batch.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).unwrap();
            let (mut rd, mut wr) = s.into_split();
            let sem = Arc::new(Semaphore::new(inflight as usize));
            let writer = {
                let sem = sem.clone();
                tokio::spawn(async move {
                    let mut corr = 0;
                    while Instant::now() < deadline {
                        sem.acquire().await.unwrap().forget();
                        corr += 1;
                        if wr
                            .write_all(&request(&topic, &records_batch, corr))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    corr
                })
            };
            let mut done = 0;
            loop {
                let mut len = [0u8; 4];
                // Past the deadline a lost race with the writer must not hang the run.
                match tokio::time::timeout(Duration::from_secs(5), rd.read_exact(&mut len)).await {
                    Ok(Ok(_)) => {}
                    _ => break,
                }
                let mut frame = vec![0u8; i32::from_be_bytes(len) as usize];
                rd.read_exact(&mut frame).await.expect("response");
                let mut b = Bytes::from(frame);
                ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(VERSION))
                    .unwrap();
                let r = ProduceResponse::decode(&mut b, VERSION).unwrap();
                let ok = r
                    .responses
                    .iter()
                    .flat_map(|t| &t.partition_responses)
                    .all(|p| p.error_code == 0);
                if ok {
                    acked.fetch_add(records, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                done += 1;
                sem.add_permits(1);
                if writer.is_finished() && Instant::now() >= deadline {
                    let sent = writer.await.unwrap();
                    while done < sent {
                        if rd.read_exact(&mut len).await.is_err() {
                            break;
                        }
                        let mut frame = vec![0u8; i32::from_be_bytes(len) as usize];
                        rd.read_exact(&mut frame).await.expect("response");
                        done += 1;
                    }
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64().min(secs as f64).max(0.001);
    let n = acked.load(Ordering::Relaxed);
    println!(
        "{{\"records_per_sec\": {:.0}, \"mb_per_sec\": {:.2}, \"records\": {n}, \"errors\": {}, \"seconds\": {elapsed:.2}}}",
        n as f64 / elapsed,
        n as f64 * size as f64 / elapsed / 1e6,
        errors.load(Ordering::Relaxed)
    );
}
