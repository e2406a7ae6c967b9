//! Batches the sidecar rejects for good. Resending such a batch unchanged
//! can never succeed, and while it waits no later usage of the instance is
//! sent. So the batch is changed before it is resent: a record the
//! sidecar names as invalid is dropped, and a batch over the sidecar's
//! size limits is halved.

use veo_proto::sync::{SyncRequest, UsageRecord};

/// gRPC status of a request with an invalid field.
pub const INVALID_ARGUMENT: u32 = 3;
/// gRPC status of a message over the server's size limit, as tonic sends
/// it for a message it refuses to decode.
pub const OUT_OF_RANGE: u32 = 11;
/// gRPC status of a message over a size limit, as other gRPC servers and
/// proxies send it.
pub const RESOURCE_EXHAUSTED: u32 = 8;

/// Returns a gRPC status message as text. gRPC percent-encodes the
/// message on the wire, and Envoy 1.40 hands it to the filter that way,
/// followed by `{via_upstream}`, as in
/// `invalid%20usage[0].customer:%20...{via_upstream}`.
pub fn decode_message(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// The change a rejected batch needs before it is resent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reshape {
    /// Drop the record at this index, which the sidecar rejected.
    DropRecord(usize),
    /// Keep the first half of the records and send the rest later.
    Halve,
    /// Resend the batch unchanged: the sidecar may take it later.
    Keep,
}

/// Returns what to change in a batch of `records` records that the
/// sidecar rejected with `status` and `message`.
pub fn reshape_for(status: u32, message: &str, records: usize) -> Reshape {
    match status {
        INVALID_ARGUMENT => match record_index(message) {
            Some(index) if index < records => Reshape::DropRecord(index),
            Some(_) => Reshape::Keep,
            // The sidecar's message for a batch with more records than its
            // `max_records_per_batch`.
            None if message.starts_with("invalid usage:") && records > 1 => Reshape::Halve,
            None => Reshape::Keep,
        },
        OUT_OF_RANGE | RESOURCE_EXHAUSTED if records > 1 => Reshape::Halve,
        _ => Reshape::Keep,
    }
}

/// Returns the index `i` of a message that starts with
/// `invalid usage[i].`, the sidecar's message for an invalid record.
fn record_index(message: &str) -> Option<usize> {
    let rest = message.strip_prefix("invalid usage[")?;
    let (digits, rest) = rest.split_once(']')?;
    if !rest.starts_with('.') || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Applies `reshape` to `request`. Returns the records taken out: the
/// dropped record, or the second half of a halved batch.
pub fn apply(request: &mut SyncRequest, reshape: Reshape) -> Vec<UsageRecord> {
    match reshape {
        Reshape::DropRecord(index) if index < request.usage.len() => {
            vec![request.usage.remove(index)]
        }
        Reshape::Halve => {
            let half = request.usage.len().div_ceil(2);
            request.usage.split_off(half)
        }
        Reshape::DropRecord(_) | Reshape::Keep => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(records: usize) -> SyncRequest {
        SyncRequest {
            usage: (0..records)
                .map(|index| UsageRecord {
                    customer: format!("c{index}"),
                    ..UsageRecord::default()
                })
                .collect(),
            ..SyncRequest::default()
        }
    }

    fn customers(records: &[UsageRecord]) -> Vec<&str> {
        records
            .iter()
            .map(|record| record.customer.as_str())
            .collect()
    }

    #[test]
    fn envoy_status_message_is_decoded() {
        let raw = "invalid%20usage[0].customer:%20must%20not%20be%20empty{via_upstream}";
        let message = decode_message(raw);
        assert_eq!(
            message,
            "invalid usage[0].customer: must not be empty{via_upstream}"
        );
        assert_eq!(
            reshape_for(INVALID_ARGUMENT, &message, 2),
            Reshape::DropRecord(0)
        );
        assert_eq!(decode_message("100%"), "100%");
    }

    #[test]
    fn invalid_record_is_dropped() {
        let message = "invalid usage[2].customer: must not be empty";
        assert_eq!(
            reshape_for(INVALID_ARGUMENT, message, 3),
            Reshape::DropRecord(2)
        );
        let mut batch = request(3);
        let dropped = apply(&mut batch, Reshape::DropRecord(2));
        assert_eq!(customers(&dropped), ["c2"]);
        assert_eq!(customers(&batch.usage), ["c0", "c1"]);
    }

    #[test]
    fn record_index_out_of_batch_keeps_it() {
        let message = "invalid usage[3].tier: must not be empty";
        assert_eq!(reshape_for(INVALID_ARGUMENT, message, 3), Reshape::Keep);
        let mut batch = request(3);
        assert!(apply(&mut batch, Reshape::DropRecord(3)).is_empty());
        assert_eq!(batch.usage.len(), 3);
    }

    #[test]
    fn oversized_batch_is_halved() {
        let too_many = "invalid usage: has 10000 records, more than the maximum 1000; \
                        send smaller batches";
        assert_eq!(reshape_for(INVALID_ARGUMENT, too_many, 5), Reshape::Halve);
        let too_large = "Error, decoded message length too large";
        assert_eq!(reshape_for(OUT_OF_RANGE, too_large, 5), Reshape::Halve);
        assert_eq!(reshape_for(RESOURCE_EXHAUSTED, "", 2), Reshape::Halve);

        let mut batch = request(5);
        let rest = apply(&mut batch, Reshape::Halve);
        assert_eq!(customers(&batch.usage), ["c0", "c1", "c2"]);
        assert_eq!(customers(&rest), ["c3", "c4"]);
    }

    #[test]
    fn single_record_is_never_halved() {
        assert_eq!(reshape_for(OUT_OF_RANGE, "", 1), Reshape::Keep);
        let too_many = "invalid usage: has 1 records, more than the maximum 0";
        assert_eq!(reshape_for(INVALID_ARGUMENT, too_many, 1), Reshape::Keep);
    }

    #[test]
    fn other_failures_resend_the_batch() {
        let cases = [
            (14, "invalid usage[0].customer: must not be empty"),
            (INVALID_ARGUMENT, "invalid instance_id: must not be empty"),
            (INVALID_ARGUMENT, "invalid usage[].customer: x"),
            (INVALID_ARGUMENT, "invalid usage[1x].customer: x"),
            (INVALID_ARGUMENT, "invalid usage[1]customer: x"),
            (
                INVALID_ARGUMENT,
                "invalid usage[99999999999999999999999].tier: x",
            ),
            (13, "failed to decode"),
        ];
        for (status, message) in cases {
            assert_eq!(reshape_for(status, message, 3), Reshape::Keep, "{message}");
        }
    }
}
