//! The Kafka request parser on arbitrary frames: head, body decoding, topic extraction, and
//! the denial response, which must itself be a well-formed response to the same request.
#![no_main]

use bytes::Bytes;
use l7::kafka_codec::{self, TOPIC_AUTHORIZATION_FAILED};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kafka_codec::frame_len(data, kafka_codec::DEFAULT_MAX_FRAME);
    let frame = Bytes::copy_from_slice(data);
    let Ok(head) = kafka_codec::parse_head(&frame) else {
        return;
    };
    let body = kafka_codec::decode_body(&head, &frame);
    if let Some(b) = &body {
        let _ = kafka_codec::request_topics(b, &|_| Some("resolved".to_string()));
    }
    if let Some(resp) =
        kafka_codec::denied_response(&head, body.as_ref(), TOPIC_AUTHORIZATION_FAILED)
    {
        let len = kafka_codec::frame_len(&resp, usize::MAX).unwrap().unwrap();
        assert_eq!(
            len,
            resp.len(),
            "the size prefix covers the response exactly"
        );
        assert_eq!(
            kafka_codec::response_correlation_id(&resp[4..]),
            Some(head.correlation_id)
        );
    }
    let _ = kafka_codec::metadata_topic_ids(head.api_version, &frame);
});
