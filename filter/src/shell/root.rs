//! The root context: loads the configuration, picks the role from the
//! plugin name, and drives the role's timer and the sync call's reply.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use super::host::{ProxyHost, debug_enabled, property};
use super::http::Http;
use crate::NAME_AND_VERSION;
use crate::config::Config;
use crate::filter::Filter;
use crate::host::{Host, LogLevel};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::sync::Sync;
use crate::sync::instance::instance_id;
use crate::usage::QUEUE_NAME;

/// Plugin name that selects the sync role; any other name runs the HTTP
/// filter.
pub const SYNC_PLUGIN_NAME: &str = "veo_sync";

/// VM id assumed when Envoy does not report one.
const DEFAULT_VM_ID: &str = "veo_edge";

/// How often a worker publishes its counters and resends held usage.
const WORKER_TICK: Duration = Duration::from_millis(250);

enum Role {
    Filter(Rc<Filter>),
    Sync(Box<Sync>),
}

/// Root context of either role.
#[derive(Default)]
pub struct Root {
    role: Option<Role>,
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if let Some(Role::Sync(sync)) = &mut self.role {
            let body = match response_size {
                0 => None,
                size => hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
                    .ok()
                    .flatten(),
            };
            let message = match status_code {
                0 => None,
                _ => super::status::grpc_status_message(),
            };
            sync.on_response(
                &ProxyHost,
                token_id,
                status_code,
                message.as_deref(),
                body.as_deref(),
            );
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(Role::Filter(filter)) = &self.role {
            filter.retire(&ProxyHost);
        }
        true
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        ProxyHost.log(LogLevel::Info, &format!("{NAME_AND_VERSION} started"));
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let host = ProxyHost;
        let plugin = property(&["plugin_name"]).unwrap_or_default();
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match Config::from_bytes(&bytes) {
            Ok(config) => config,
            Err(error) => {
                host.log(
                    LogLevel::Error,
                    &format!("plugin {plugin} not configured: {error}"),
                );
                return false;
            }
        };

        let configured = if plugin == SYNC_PLUGIN_NAME {
            self.configure_sync(&host, config)
        } else {
            self.configure_filter(&host, config)
        };
        match configured {
            Ok(role) => {
                host.log(
                    LogLevel::Info,
                    &format!("plugin {plugin} configured role={role}"),
                );
                true
            }
            Err(problem) => {
                host.log(
                    LogLevel::Error,
                    &format!("plugin {plugin} not configured: {problem}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        match &mut self.role {
            Some(Role::Filter(filter)) => {
                filter.set_debug(debug_enabled());
                filter.on_tick(&ProxyHost);
            }
            Some(Role::Sync(sync)) => sync.on_tick(&ProxyHost),
            None => {}
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Some(Role::Filter(filter)) => Some(Box::new(Http::new(Rc::clone(filter)))),
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    fn configure_filter(&mut self, host: &ProxyHost, config: Config) -> Result<String, String> {
        let vm_id = property(&["plugin_vm_id"]).unwrap_or_else(|| DEFAULT_VM_ID.to_owned());
        let filter = Filter::new(host, config, &vm_id);
        filter.set_debug(debug_enabled());
        hostcalls::set_tick_period(WORKER_TICK)
            .map_err(|status| format!("could not start the timer: status {}", status as u32))?;
        if let Some(Role::Filter(replaced)) = &self.role {
            replaced.retire(host);
        }
        self.role = Some(Role::Filter(Rc::new(filter)));
        Ok(format!("http_filter vm_id={vm_id}"))
    }

    fn configure_sync(&mut self, host: &ProxyHost, mut config: Config) -> Result<String, String> {
        let settings = config.sidecar.clone();
        let interval = settings.sync_interval;
        if let Some(Role::Sync(sync)) = &mut self.role {
            // Keep the unacknowledged batch and the sequence across a
            // configuration update.
            sync.reconfigure(
                settings,
                config.tiers.clone(),
                Limiter::new(config.max_customers),
                config.geo.take(),
            );
        } else {
            let queue_id = host
                .register_shared_queue(QUEUE_NAME)
                .map_err(|error| format!("could not register queue {QUEUE_NAME}: {error}"))?;
            let node = property(&["xds", "node", "id"]).unwrap_or_default();
            let instance_id = instance_id(&node, &random_id(host));
            let metrics = Metrics::define(host, &config.tiers);
            host.log(
                LogLevel::Info,
                &format!(
                    "usage sync instance_id={instance_id} cluster={}",
                    settings.cluster
                ),
            );
            self.role = Some(Role::Sync(Box::new(Sync::new(
                settings,
                instance_id,
                queue_id,
                metrics,
                config.tiers.clone(),
                Limiter::new(config.max_customers),
                config.geo.take(),
            ))));
        }
        hostcalls::set_tick_period(interval)
            .map_err(|status| format!("could not start the timer: status {}", status as u32))?;
        Ok("usage_sync".to_owned())
    }
}

/// Returns 16 hex digits from the system's random source, falling back
/// to the clock if the host offers none.
fn random_id(host: &ProxyHost) -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        bytes = host.now_ms().to_le_bytes();
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
