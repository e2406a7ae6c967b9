//! Validation of gRPC requests into the ledger's values; each error names
//! the request field.

use veo_proto::sync::SyncRequest;
use veo_proto::usage;

use crate::ledger::{Batch, Granularity, MINUTE_SECONDS, QuotaSpec, TimeRange, UsageEntry};
use crate::status::ServiceError;

/// Maximum length of an instance or customer identifier, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Maximum length of a tier name, in bytes.
pub const MAX_TIER_BYTES: usize = 64;
// The store saturates totals at 2^63 - 1, which only many batches of the
// largest record for one key can reach.
pub use veo_proto::sync_limits::{MAX_EGRESS_BYTES_PER_RECORD, MAX_REQUESTS_PER_RECORD};
/// Latest accepted minute: 9999-12-31T23:59:00Z, in seconds since the
/// Unix epoch.
pub const MAX_MINUTE_UNIX_S: i64 = 253_402_300_740;
/// Maximum accepted quota, in requests per window.
pub const MAX_QUOTA_REQUESTS: u64 = 4_294_967_295;
/// Maximum accepted quota window, in milliseconds (one day).
pub const MAX_QUOTA_WINDOW_MS: u64 = 86_400_000;
/// Maximum number of buckets one usage query may span.
pub const MAX_QUERY_BUCKETS: i64 = 100_000;
/// Customers listed when a top-customers request leaves `limit` at 0.
pub const DEFAULT_TOP_LIMIT: u32 = 10;
/// Largest `limit` served; larger requests are served this many customers.
pub const MAX_TOP_LIMIT: u32 = 1_000;

/// Checks a sync request and converts it into a [`Batch`].
pub fn sync_batch(request: SyncRequest, max_records: usize) -> Result<Batch, ServiceError> {
    identifier("instance_id", &request.instance_id, MAX_ID_BYTES)?;
    if request.sequence == 0 && !request.usage.is_empty() {
        return Err(ServiceError::invalid(
            "sequence",
            "must be at least 1 in a batch with usage; 0 is for polls without usage",
        ));
    }
    let sequence = i64::try_from(request.sequence)
        .map_err(|_| ServiceError::invalid("sequence", format!("must be at most {}", i64::MAX)))?;
    // The store keeps the version an instance acknowledged as an SQLite
    // integer.
    if i64::try_from(request.erasures_version).is_err() {
        let reason = format!(
            "{} is more than the maximum {}; send the erasures_version of the last reply",
            request.erasures_version,
            i64::MAX
        );
        return Err(ServiceError::invalid("erasures_version", reason));
    }
    if request.usage.len() > max_records {
        let reason = format!(
            "has {} records, more than the maximum {max_records}; send smaller batches",
            request.usage.len()
        );
        return Err(ServiceError::invalid("usage", reason));
    }

    let records = request
        .usage
        .into_iter()
        .enumerate()
        .map(|(index, record)| usage_entry(index, record))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Batch {
        instance_id: request.instance_id,
        sequence,
        records,
    })
}

fn usage_entry(
    index: usize,
    record: veo_proto::sync::UsageRecord,
) -> Result<UsageEntry, ServiceError> {
    let field = |name: &str| format!("usage[{index}].{name}");

    identifier(&field("customer"), &record.customer, MAX_ID_BYTES)?;
    identifier(&field("tier"), &record.tier, MAX_TIER_BYTES)?;
    let minute = record.minute_unix_s;
    if minute % MINUTE_SECONDS != 0 {
        let reason = format!("{minute} is not a multiple of {MINUTE_SECONDS} seconds");
        return Err(ServiceError::invalid(field("minute_unix_s"), reason));
    }
    if !(0..=MAX_MINUTE_UNIX_S).contains(&minute) {
        let reason = format!("{minute} is outside 0..={MAX_MINUTE_UNIX_S}");
        return Err(ServiceError::invalid(field("minute_unix_s"), reason));
    }

    let quota = match (record.quota_requests, record.quota_window_ms) {
        (0, 0) => None,
        (requests, window_ms) => {
            if requests == 0 {
                let reason = format!(
                    "0 with a quota_window_ms of {window_ms}; a quota is 1 to \
                     {MAX_QUOTA_REQUESTS} requests, or send both as 0 for a tier without one"
                );
                return Err(ServiceError::invalid(field("quota_requests"), reason));
            }
            if requests > MAX_QUOTA_REQUESTS {
                let reason = format!("{requests} is more than the maximum {MAX_QUOTA_REQUESTS}");
                return Err(ServiceError::invalid(field("quota_requests"), reason));
            }
            if !(1..=MAX_QUOTA_WINDOW_MS).contains(&window_ms) {
                let reason = format!(
                    "{window_ms} is outside 1..={MAX_QUOTA_WINDOW_MS}; a quota needs its window"
                );
                return Err(ServiceError::invalid(field("quota_window_ms"), reason));
            }
            Some(QuotaSpec {
                requests,
                window_ms,
            })
        }
    };

    Ok(UsageEntry {
        quota,
        admitted: request_count(&field("admitted_requests"), record.admitted_requests)?,
        refused: request_count(&field("refused_requests"), record.refused_requests)?,
        egress_bytes: egress_bytes(&field("egress_bytes"), record.egress_bytes)?,
        customer: record.customer,
        tier: record.tier,
        minute_unix_s: minute,
    })
}

fn request_count(field: &str, count: u64) -> Result<i64, ServiceError> {
    let too_large = || {
        let reason = format!("{count} is more than the maximum {MAX_REQUESTS_PER_RECORD}");
        ServiceError::invalid(field, reason)
    };
    if count > MAX_REQUESTS_PER_RECORD {
        return Err(too_large());
    }
    i64::try_from(count).map_err(|_| too_large())
}

fn egress_bytes(field: &str, bytes: u64) -> Result<i64, ServiceError> {
    if bytes > MAX_EGRESS_BYTES_PER_RECORD {
        let reason = format!("{bytes} is more than the maximum {MAX_EGRESS_BYTES_PER_RECORD}");
        return Err(ServiceError::invalid(field, reason));
    }
    i64::try_from(bytes).map_err(|_| ServiceError::invalid(field, format!("{bytes} is too large")))
}

/// Checks that an identifier is non-empty, at most `max_bytes` long and
/// free of control characters. Identifiers go into log lines and query
/// results, where a newline or an escape sequence would forge or garble
/// output.
pub fn identifier(field: &str, value: &str, max_bytes: usize) -> Result<(), ServiceError> {
    if value.is_empty() {
        return Err(ServiceError::invalid(field, "must not be empty"));
    }
    if value.len() > max_bytes {
        let reason = format!("is {} bytes long, more than {max_bytes}", value.len());
        return Err(ServiceError::invalid(field, reason));
    }
    if let Some((at, control)) = value.char_indices().find(|(_, c)| c.is_control()) {
        let reason = format!(
            "contains the control character U+{:04X} at byte {at}; identifiers must be printable",
            u32::from(control)
        );
        return Err(ServiceError::invalid(field, reason));
    }
    Ok(())
}

/// Checks `[start, end)` and the granularity of a usage query, and that the
/// range spans at most [`MAX_QUERY_BUCKETS`] buckets.
pub fn usage_query(
    request: &usage::GetUsageRequest,
) -> Result<(TimeRange, Granularity), ServiceError> {
    identifier("customer", &request.customer, MAX_ID_BYTES)?;
    let range = time_range(request.start_unix_s, request.end_unix_s)?;
    let granularity = match usage::Granularity::try_from(request.granularity) {
        Ok(usage::Granularity::Unspecified | usage::Granularity::Minute) => Granularity::Minute,
        Ok(usage::Granularity::Hour) => Granularity::Hour,
        Ok(usage::Granularity::Day) => Granularity::Day,
        Err(_) => {
            let reason = format!("{} is not a known granularity", request.granularity);
            return Err(ServiceError::invalid("granularity", reason));
        }
    };

    let span = i128::from(range.end_unix_s) - i128::from(range.start_unix_s);
    let buckets = span / i128::from(granularity.seconds());
    if buckets > i128::from(MAX_QUERY_BUCKETS) {
        let reason = format!(
            "the range spans {buckets} buckets, more than {MAX_QUERY_BUCKETS}; \
             narrow the range or use a coarser granularity"
        );
        return Err(ServiceError::invalid("end_unix_s", reason));
    }
    Ok((range, granularity))
}

/// Checks the range of a top-customers query and returns it with the
/// number of customers to list.
pub fn top_query(
    request: &usage::ListTopCustomersRequest,
) -> Result<(TimeRange, u32), ServiceError> {
    let range = time_range(request.start_unix_s, request.end_unix_s)?;
    let limit = match request.limit {
        0 => DEFAULT_TOP_LIMIT,
        limit => limit.min(MAX_TOP_LIMIT),
    };
    Ok((range, limit))
}

fn time_range(start_unix_s: i64, end_unix_s: i64) -> Result<TimeRange, ServiceError> {
    if end_unix_s <= start_unix_s {
        let reason = format!("{end_unix_s} must be greater than start_unix_s {start_unix_s}");
        return Err(ServiceError::invalid("end_unix_s", reason));
    }
    Ok(TimeRange {
        start_unix_s,
        end_unix_s,
    })
}

#[cfg(test)]
mod tests {
    use veo_proto::sync::UsageRecord;

    use super::*;

    fn record() -> UsageRecord {
        UsageRecord {
            customer: "c1".into(),
            tier: "basic".into(),
            minute_unix_s: 1_700_000_040,
            admitted_requests: 3,
            refused_requests: 1,
            quota_requests: 60,
            quota_window_ms: 60_000,
            egress_bytes: 0,
        }
    }

    fn request(records: Vec<UsageRecord>) -> SyncRequest {
        SyncRequest {
            instance_id: "node-1/vm-1".into(),
            sequence: 7,
            created_unix_ms: 0,
            usage: records,
            tier_overrides_version: 0,
            asset_regions_version: 0,
            erasures_version: 0,
        }
    }

    /// Returns the field an invalid request is rejected for.
    fn rejected_field(request: SyncRequest) -> String {
        match sync_batch(request, 10) {
            Err(ServiceError::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn valid_request_becomes_batch() {
        let batch = sync_batch(request(vec![record()]), 10).unwrap();

        assert_eq!(batch.instance_id, "node-1/vm-1");
        assert_eq!(batch.sequence, 7);
        let expected = UsageEntry {
            customer: "c1".into(),
            tier: "basic".into(),
            minute_unix_s: 1_700_000_040,
            admitted: 3,
            refused: 1,
            egress_bytes: 0,
            quota: Some(QuotaSpec {
                requests: 60,
                window_ms: 60_000,
            }),
        };
        assert_eq!(batch.records, vec![expected]);
    }

    #[test]
    fn empty_usage_is_valid() {
        assert!(sync_batch(request(vec![]), 10).is_ok());
    }

    #[test]
    fn sync_rejections_name_the_field() {
        type Mutation = Box<dyn Fn(&mut SyncRequest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("instance_id", Box::new(|r| r.instance_id.clear())),
            (
                "erasures_version",
                Box::new(|r| r.erasures_version = 1 << 63),
            ),
            ("instance_id", Box::new(|r| r.instance_id = "x".repeat(257))),
            (
                "instance_id",
                Box::new(|r| r.instance_id = "node\nERROR forged line".into()),
            ),
            (
                "usage[1].customer",
                Box::new(|r| r.usage[1].customer = "c\u{1b}[31m".into()),
            ),
            (
                "usage[0].tier",
                Box::new(|r| r.usage[0].tier = "pro\0".into()),
            ),
            ("sequence", Box::new(|r| r.sequence = 0)),
            ("sequence", Box::new(|r| r.sequence = u64::MAX)),
            ("usage", Box::new(|r| r.usage = vec![record(); 11])),
            (
                "usage[1].customer",
                Box::new(|r| r.usage[1].customer.clear()),
            ),
            ("usage[0].tier", Box::new(|r| r.usage[0].tier.clear())),
            (
                "usage[1].minute_unix_s",
                Box::new(|r| r.usage[1].minute_unix_s += 30),
            ),
            (
                "usage[0].minute_unix_s",
                Box::new(|r| r.usage[0].minute_unix_s = -60),
            ),
            (
                "usage[0].minute_unix_s",
                Box::new(|r| r.usage[0].minute_unix_s = MAX_MINUTE_UNIX_S + 60),
            ),
            (
                "usage[1].admitted_requests",
                Box::new(|r| r.usage[1].admitted_requests = MAX_REQUESTS_PER_RECORD + 1),
            ),
            (
                "usage[0].refused_requests",
                Box::new(|r| r.usage[0].refused_requests = u64::MAX),
            ),
            (
                "usage[1].quota_requests",
                Box::new(|r| r.usage[1].quota_requests = 0),
            ),
            (
                "usage[0].quota_window_ms",
                Box::new(|r| r.usage[0].quota_window_ms = 0),
            ),
        ];

        for (field, break_request) in cases {
            let mut invalid = request(vec![record(), record()]);
            break_request(&mut invalid);

            assert_eq!(rejected_field(invalid), field);
        }
    }

    #[test]
    fn unicode_identifiers_are_accepted() {
        let mut unicode = request(vec![record()]);
        unicode.instance_id = "nœud-1/ab".into();
        unicode.usage[0].customer = "kunde-ü-😀".into();

        let batch = sync_batch(unicode, 10).unwrap();

        assert_eq!(batch.records[0].customer, "kunde-ü-😀");
    }

    #[test]
    fn control_character_rejection_names_position() {
        let mut invalid = request(vec![record()]);
        invalid.usage[0].customer = "a\nb".into();

        let message = sync_batch(invalid, 10).unwrap_err().to_string();

        assert_eq!(
            message,
            "invalid usage[0].customer: contains the control character U+000A at byte 1; \
             identifiers must be printable"
        );
    }

    #[test]
    fn rejection_message_names_value() {
        let mut invalid = request(vec![record()]);
        invalid.usage[0].minute_unix_s = 1_700_000_050;

        let message = sync_batch(invalid, 10).unwrap_err().to_string();

        assert_eq!(
            message,
            "invalid usage[0].minute_unix_s: 1700000050 is not a multiple of 60 seconds"
        );
    }

    fn usage_request(start: i64, end: i64, granularity: i32) -> usage::GetUsageRequest {
        usage::GetUsageRequest {
            customer: "c1".into(),
            start_unix_s: start,
            end_unix_s: end,
            granularity,
        }
    }

    #[test]
    fn unspecified_granularity_means_minute() {
        let (range, granularity) = usage_query(&usage_request(0, 60, 0)).unwrap();

        assert_eq!(granularity, Granularity::Minute);
        assert_eq!(range.end_unix_s, 60);
    }

    #[test]
    fn usage_query_rejections_name_the_field() {
        let day = usage::Granularity::Day as i32;
        let minute = usage::Granularity::Minute as i32;
        let mut no_customer = usage_request(0, 60, day);
        no_customer.customer.clear();
        let mut control_customer = usage_request(0, 60, day);
        control_customer.customer = "c1\r\n".into();
        let cases = [
            (no_customer, "customer"),
            (control_customer, "customer"),
            (usage_request(60, 60, day), "end_unix_s"),
            (usage_request(60, 0, day), "end_unix_s"),
            (usage_request(0, 60, 42), "granularity"),
            (
                usage_request(0, 60 * (MAX_QUERY_BUCKETS + 1), minute),
                "end_unix_s",
            ),
            (usage_request(i64::MIN, i64::MAX, day), "end_unix_s"),
        ];

        for (request, field) in cases {
            match usage_query(&request) {
                Err(ServiceError::InvalidArgument { field: got, .. }) => assert_eq!(got, field),
                other => panic!("expected {field} to be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn top_limit_defaults_and_caps() {
        let request = |limit| usage::ListTopCustomersRequest {
            start_unix_s: 0,
            end_unix_s: 60,
            limit,
        };

        assert_eq!(top_query(&request(0)).unwrap().1, DEFAULT_TOP_LIMIT);
        assert_eq!(top_query(&request(5)).unwrap().1, 5);
        assert_eq!(top_query(&request(5_000)).unwrap().1, MAX_TOP_LIMIT);
    }

    #[test]
    fn top_query_rejects_empty_range() {
        let request = usage::ListTopCustomersRequest {
            start_unix_s: 100,
            end_unix_s: 100,
            limit: 0,
        };

        let err = top_query(&request).unwrap_err();

        assert!(
            matches!(err, ServiceError::InvalidArgument { ref field, .. } if field == "end_unix_s")
        );
    }
}
