//! A migration's options and progress on the wire, and what a source asks
//! of the target's QEMU.

use std::time::Duration;

use hypervisor::migration::UNCAPPED_BANDWIDTH;
use kvm_agent_proto::v1 as pb;

use crate::error::AgentError;
use crate::model::{MigrateOptions, MigrationReport, ReportPhase, StreamRequest};

/// A migration's progress as the API shows it.
pub fn report_to_proto(report: &MigrationReport) -> pb::MigrationProgress {
    let ms = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_millis() as u64);
    let status = report.status.as_ref();
    pb::MigrationProgress {
        phase: match report.phase {
            ReportPhase::Preparing => pb::MigrationPhase::Preparing,
            ReportPhase::Active => pb::MigrationPhase::Active,
            ReportPhase::Finalizing => pb::MigrationPhase::Finalizing,
            ReportPhase::Completed => pb::MigrationPhase::Completed,
        } as i32,
        qemu_status: status.map(|s| s.status.clone()).unwrap_or_default(),
        transferred_bytes: status.map_or(0, |s| s.transferred_bytes),
        remaining_bytes: status.map_or(0, |s| s.remaining_bytes),
        total_bytes: status.map_or(0, |s| s.total_bytes),
        dirty_rate_bytes_per_second: status.map_or(0, |s| s.dirty_rate_bytes_per_second),
        expected_downtime_ms: ms(status.and_then(|s| s.expected_downtime)),
        downtime_ms: ms(status.and_then(|s| s.downtime)),
        elapsed_ms: report.elapsed.as_millis() as u64,
        address: report.address.clone(),
        encrypted: report.encrypted,
        passes: status.map_or(0, |s| s.passes),
        throttle_percent: status.map_or(0, |s| u32::from(s.throttle_percent)),
        postcopy: status.is_some_and(|s| s.postcopy),
    }
}

/// The longest pause QEMU accepts as a migration's downtime limit.
pub const MAX_DOWNTIME_LIMIT: Duration = Duration::from_secs(2000);

/// A migration's options, checked against what QEMU accepts before it
/// sees them.
pub fn migrate_options_from_proto(
    options: pb::MigrationOptions,
) -> Result<MigrateOptions, AgentError> {
    let downtime_limit = Duration::from_millis(options.downtime_limit_ms.into());
    if downtime_limit > MAX_DOWNTIME_LIMIT {
        return Err(AgentError::BadRequest(format!(
            "downtime_limit_ms is {}; QEMU takes at most {} ms",
            options.downtime_limit_ms,
            MAX_DOWNTIME_LIMIT.as_millis()
        )));
    }
    if options.max_bandwidth > UNCAPPED_BANDWIDTH {
        return Err(AgentError::BadRequest(format!(
            "max_bandwidth is {} bytes/s; the most is {UNCAPPED_BANDWIDTH}, and 0 means uncapped",
            options.max_bandwidth
        )));
    }
    if options.xbzrle_cache_bytes != 0
        && !(MIN_XBZRLE_CACHE..=UNCAPPED_BANDWIDTH).contains(&options.xbzrle_cache_bytes)
    {
        return Err(AgentError::BadRequest(format!(
            "xbzrle_cache_bytes is {}; use {MIN_XBZRLE_CACHE} (a page) up to {UNCAPPED_BANDWIDTH}, or 0 for no XBZRLE",
            options.xbzrle_cache_bytes
        )));
    }
    let multifd_channels = match options.multifd_channels {
        0 => None,
        n @ 1..=MAX_MULTIFD_CHANNELS => Some(n as u8),
        n => {
            return Err(AgentError::BadRequest(format!(
                "multifd_channels is {n}; use 1 to {MAX_MULTIFD_CHANNELS}, or 0 for none"
            )));
        }
    };
    if multifd_channels.is_some() && options.postcopy {
        // QEMU 7.2 refuses the two capabilities together.
        return Err(AgentError::BadRequest(
            "multifd channels and postcopy don't go together; choose one".into(),
        ));
    }
    Ok(MigrateOptions {
        offline: options.offline,
        max_bandwidth: (options.max_bandwidth > 0).then_some(options.max_bandwidth),
        downtime_limit: (options.downtime_limit_ms > 0).then_some(downtime_limit),
        auto_converge: options.auto_converge,
        xbzrle_cache: (options.xbzrle_cache_bytes > 0).then_some(options.xbzrle_cache_bytes),
        multifd_channels,
        unencrypted: options.unencrypted,
        throttle_initial: percent("throttle_initial_percent", options.throttle_initial_percent)?,
        throttle_increment: percent(
            "throttle_increment_percent",
            options.throttle_increment_percent,
        )?,
        stalled_passes: (options.stalled_passes_limit > 0).then_some(options.stalled_passes_limit),
        postcopy: options.postcopy,
        postcopy_recovery_window: (options.postcopy_recovery_window_ms > 0)
            .then(|| Duration::from_millis(options.postcopy_recovery_window_ms.into())),
    })
}

/// What a source asks of the target's QEMU in AcceptMigration.
pub fn stream_request_from_proto(
    req: &pb::AcceptMigrationRequest,
) -> Result<StreamRequest, AgentError> {
    let multifd_channels = match u8::try_from(req.multifd_channels) {
        Ok(0) => None,
        Ok(channels) => Some(channels),
        Err(_) => {
            return Err(AgentError::BadRequest(format!(
                "multifd_channels is {}; QEMU takes at most 255",
                req.multifd_channels
            )));
        }
    };
    Ok(StreamRequest {
        multifd_channels,
        encrypted: req.encrypted_stream,
        postcopy: req.postcopy,
    })
}

/// The wire form of what a source asks of the target's QEMU.
pub fn stream_request_to_proto(stream: StreamRequest, req: &mut pb::AcceptMigrationRequest) {
    req.multifd_channels = stream.multifd_channels.map_or(0, u32::from);
    req.encrypted_stream = stream.encrypted;
    req.postcopy = stream.postcopy;
}

/// A throttle share: 1 to 99 percent, or 0 for QEMU's default.
fn percent(field: &str, value: u32) -> Result<Option<u8>, AgentError> {
    match value {
        0 => Ok(None),
        1..=99 => Ok(Some(value as u8)),
        _ => Err(AgentError::BadRequest(format!(
            "{field} is {value}; use 1 to 99, or 0 for QEMU's default"
        ))),
    }
}

/// The most multifd connections a migration may ask for: each is a
/// thread on both sides, and past the cores a node has they only add
/// overhead.
const MAX_MULTIFD_CHANNELS: u32 = 64;

/// The smallest XBZRLE cache QEMU takes: one page.
const MIN_XBZRLE_CACHE: u64 = 4096;
