//! Whether a precopy migration still gets closer to its end. A guest that
//! dirties memory faster than the link carries it leaves as much to send
//! after each pass as before, and precopy would copy forever. Pure.

use super::{MAX_THROTTLE, MigrationPhase, MigrationStatus};

/// Passes in a row without progress after which precopy has stalled, by
/// default.
pub const DEFAULT_STALLED_PASSES: u32 = 10;

/// Follows the passes of one migration.
#[derive(Debug, Clone)]
pub struct ConvergenceWatch {
    limit: u32,
    auto_converge: bool,
    last_pass: u64,
    least_left: Option<u64>,
    stalled: u32,
}

/// Precopy has stopped converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// Passes so far.
    pub passes: u64,
    /// Memory still to send at the end of the last pass.
    pub remaining_bytes: u64,
    /// The guest's dirty rate then, in bytes per second.
    pub dirty_rate_bytes_per_second: u64,
    /// The throttle then, in percent.
    pub throttle_percent: u8,
}

impl ConvergenceWatch {
    /// A watch that calls `limit` passes in a row that leave no less to
    /// send than the best pass so far a stall. With `auto_converge`, a
    /// pass counts only once the throttle is at its highest: until then
    /// QEMU still has a way to converge.
    pub fn new(limit: u32, auto_converge: bool) -> Self {
        Self {
            limit: limit.max(1),
            auto_converge,
            last_pass: 0,
            least_left: None,
            stalled: 0,
        }
    }

    /// Takes the next `query-migrate` snapshot; says so once precopy has
    /// stalled.
    pub fn observe(&mut self, status: &MigrationStatus) -> Option<Stall> {
        // Memory left is only comparable right after a pass: within one it
        // falls as pages go.
        if status.phase != MigrationPhase::Active
            || status.postcopy
            || status.passes <= self.last_pass
        {
            return None;
        }
        self.last_pass = status.passes;
        let left = status.remaining_bytes;
        if self.least_left.is_none_or(|least| left < least) {
            self.least_left = Some(left);
            self.stalled = 0;
            return None;
        }
        if self.auto_converge && status.throttle_percent < MAX_THROTTLE {
            return None;
        }
        self.stalled += 1;
        (self.stalled >= self.limit).then_some(Stall {
            passes: status.passes,
            remaining_bytes: left,
            dirty_rate_bytes_per_second: status.dirty_rate_bytes_per_second,
            throttle_percent: status.throttle_percent,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pass(passes: u64, remaining: u64, throttle: u8) -> MigrationStatus {
        MigrationStatus::from_query(&json!({
            "status": "active",
            "cpu-throttle-percentage": throttle,
            "ram": {
                "dirty-sync-count": passes,
                "remaining": remaining,
                "dirty-pages-rate": 2560,
                "page-size": 4096,
            },
        }))
    }

    #[test]
    fn a_guest_that_leaves_as_much_after_each_pass_stalls() {
        let mut watch = ConvergenceWatch::new(3, false);
        assert_eq!(watch.observe(&pass(1, 64 << 20, 0)), None);
        assert_eq!(watch.observe(&pass(2, 20 << 20, 0)), None);
        // The same pass seen again counts once.
        assert_eq!(watch.observe(&pass(3, 21 << 20, 0)), None);
        assert_eq!(watch.observe(&pass(3, 21 << 20, 0)), None);
        assert_eq!(watch.observe(&pass(4, 20 << 20, 0)), None);
        let stall = watch.observe(&pass(5, 22 << 20, 0)).expect("stalled");
        assert_eq!(stall.passes, 5);
        assert_eq!(stall.remaining_bytes, 22 << 20);
        assert_eq!(stall.dirty_rate_bytes_per_second, 10 << 20);
    }

    #[test]
    fn progress_starts_the_count_again() {
        let mut watch = ConvergenceWatch::new(2, false);
        watch.observe(&pass(1, 50 << 20, 0));
        assert_eq!(watch.observe(&pass(2, 60 << 20, 0)), None);
        assert_eq!(watch.observe(&pass(3, 40 << 20, 0)), None);
        assert_eq!(watch.observe(&pass(4, 45 << 20, 0)), None);
        assert!(watch.observe(&pass(5, 41 << 20, 0)).is_some());
    }

    #[test]
    fn auto_converge_has_until_its_highest_throttle() {
        let mut watch = ConvergenceWatch::new(2, true);
        watch.observe(&pass(1, 50 << 20, 0));
        for (n, throttle) in (2..8).zip([0, 20, 40, 60, 80, 98]) {
            assert_eq!(watch.observe(&pass(n, 50 << 20, throttle)), None);
        }
        assert_eq!(watch.observe(&pass(8, 50 << 20, MAX_THROTTLE)), None);
        assert!(watch.observe(&pass(9, 50 << 20, MAX_THROTTLE)).is_some());
    }

    #[test]
    fn postcopy_and_the_end_are_not_passes() {
        let mut watch = ConvergenceWatch::new(1, false);
        watch.observe(&pass(1, 10 << 20, 0));
        let mut postcopy = pass(2, 10 << 20, 0);
        postcopy.postcopy = true;
        assert_eq!(watch.observe(&postcopy), None);
        let mut completed = pass(3, 10 << 20, 0);
        completed.phase = MigrationPhase::Completed;
        assert_eq!(watch.observe(&completed), None);
    }
}
