//! [`Host`] on proxy-wasm hostcalls. The SDK's context methods unwrap
//! host errors, but the hostcalls return them, so this uses the hostcalls.
//! Header values are read as bytes because they need not be UTF-8.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel as ProxyLogLevel, MapType, MetricType, Status};

use crate::host::{Host, HostError, LogLevel, SetError, SharedValue};

/// The host of the current proxy-wasm context.
pub struct ProxyHost;

fn error(status: Status) -> HostError {
    HostError(status as u32)
}

impl Host for ProxyHost {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }

    fn get_shared_data(&self, key: &str) -> Result<SharedValue, HostError> {
        let (bytes, cas) = hostcalls::get_shared_data(key).map_err(error)?;
        Ok(SharedValue { bytes, cas })
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|status| match status {
            Status::CasMismatch => SetError::CasMismatch,
            other => SetError::Host(error(other)),
        })
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, HostError> {
        hostcalls::register_shared_queue(name).map_err(error)
    }

    fn resolve_shared_queue(&self, vm_id: &str, name: &str) -> Result<Option<u32>, HostError> {
        hostcalls::resolve_shared_queue(vm_id, name).map_err(error)
    }

    fn enqueue_shared_queue(&self, queue_id: u32, message: &[u8]) -> Result<(), HostError> {
        hostcalls::enqueue_shared_queue(queue_id, Some(message)).map_err(error)
    }

    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::dequeue_shared_queue(queue_id).map_err(error)
    }

    fn request_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name).map_err(error)
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value.as_bytes()))
            .map_err(error)
    }

    fn remove_request_header(&self, name: &str) -> Result<(), HostError> {
        hostcalls::remove_map_value(MapType::HttpRequestHeaders, name).map_err(error)
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_property(path.to_vec()).map_err(error)
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).map_err(error)
    }

    fn send_local_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        hostcalls::send_http_response(status, headers.to_vec(), Some(body)).map_err(error)
    }

    fn dispatch_grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        hostcalls::dispatch_grpc_call(cluster, service, method, Vec::new(), Some(message), timeout)
            .map_err(error)
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), HostError> {
        hostcalls::set_tick_period(period).map_err(error)
    }

    fn define_counter(&self, name: &str) -> Result<u32, HostError> {
        hostcalls::define_metric(MetricType::Counter, name).map_err(error)
    }

    fn increment_metric(&self, metric_id: u32, offset: u64) -> Result<(), HostError> {
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        hostcalls::increment_metric(metric_id, offset).map_err(error)
    }

    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => ProxyLogLevel::Trace,
            LogLevel::Debug => ProxyLogLevel::Debug,
            LogLevel::Info => ProxyLogLevel::Info,
            LogLevel::Warn => ProxyLogLevel::Warn,
            LogLevel::Error => ProxyLogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
    }
}

/// Returns whether Envoy logs wasm debug lines.
pub fn debug_enabled() -> bool {
    matches!(
        hostcalls::get_log_level(),
        Ok(ProxyLogLevel::Trace | ProxyLogLevel::Debug)
    )
}

/// Reads a string property such as `plugin_name` or `xds.node.id`.
pub fn property(path: &[&str]) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok()??;
    String::from_utf8(bytes).ok()
}
