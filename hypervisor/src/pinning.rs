//! vCPU pinning: which host CPUs each vCPU thread may run on.
//!
//! The text form is Ganeti's `cpu_mask`: `all`, a CPU list such as
//! `0-3,6` for every vCPU, or one entry per vCPU separated by `:`, such as
//! `0:1:2-3:all`. Parsing and checks are pure; the `affinity` module applies
//! a pinning to a running QEMU's threads.

use std::collections::BTreeSet;
use std::fmt;

use nix::unistd::{SysconfVar, sysconf};
use serde::{Deserialize, Serialize};

/// Host CPUs a vCPU may run on; empty means any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuList(BTreeSet<u32>);

/// What each vCPU is pinned to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CpuPinning {
    /// Every vCPU to the same CPUs.
    All(CpuList),
    /// vCPU `i` to entry `i`.
    PerVcpu(Vec<CpuList>),
}

/// Why a mask can't be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinningError {
    /// Not in the mask syntax.
    #[error(
        "CPU mask {mask:?} is invalid ({reason}): use \"all\", a CPU list like \"0-3,6\" for every vCPU, or one list per vCPU like \"0:1:2-3\""
    )]
    Syntax {
        /// The mask as given.
        mask: String,
        /// What is wrong.
        reason: String,
    },
    /// A per-vCPU mask with the wrong number of entries.
    #[error(
        "CPU mask {mask:?} has {entries} entries for {vcpus} vCPUs; give one per vCPU, or one list for all"
    )]
    EntryCount {
        /// The mask.
        mask: String,
        /// Its entries.
        entries: usize,
        /// The instance's vCPUs.
        vcpus: u32,
    },
    /// A CPU this host doesn't have.
    #[error("CPU mask {mask:?} names CPU {cpu}, but this host has CPUs 0-{last}")]
    NoSuchCpu {
        /// The mask.
        mask: String,
        /// The missing CPU.
        cpu: u32,
        /// The host's highest CPU.
        last: u32,
    },
}

/// Masks longer than this are refused before parsing.
const MAX_MASK_LEN: usize = 4096;
/// Highest CPU number accepted in a mask (Linux's default NR_CPUS ceiling).
const MAX_CPU: u32 = 8191;

impl CpuList {
    /// The CPUs, ascending; empty means any.
    pub fn cpus(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// Whether any CPU will do.
    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text == "all" {
            return Ok(Self::default());
        }
        let mut cpus = BTreeSet::new();
        for item in text.split(',') {
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            let number = |s: &str| {
                s.parse::<u32>()
                    .ok()
                    .filter(|n| *n <= MAX_CPU)
                    .ok_or_else(|| format!("{item:?} is not a CPU number or range"))
            };
            let (first, last) = (number(first)?, number(last)?);
            if first > last {
                return Err(format!("range {item:?} runs backwards"));
            }
            cpus.extend(first..=last);
        }
        Ok(Self(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("all");
        }
        let mut cpus = self.0.iter().copied().peekable();
        let mut first_range = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.peek() == Some(&(end + 1)) {
                end += 1;
                cpus.next();
            }
            if !first_range {
                f.write_str(",")?;
            }
            first_range = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for CpuPinning {
    type Err = PinningError;

    fn from_str(mask: &str) -> Result<Self, PinningError> {
        let syntax = |reason: String| PinningError::Syntax {
            mask: mask.chars().take(64).collect(),
            reason,
        };
        if mask.len() > MAX_MASK_LEN {
            return Err(syntax(format!("longer than {MAX_MASK_LEN} bytes")));
        }
        let entries = mask
            .split(':')
            .map(CpuList::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(syntax)?;
        Ok(match <[CpuList; 1]>::try_from(entries) {
            Ok([all]) => CpuPinning::All(all),
            Err(entries) => CpuPinning::PerVcpu(entries),
        })
    }
}

impl fmt::Display for CpuPinning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuPinning::All(list) => list.fmt(f),
            CpuPinning::PerVcpu(lists) => {
                for (i, list) in lists.iter().enumerate() {
                    if i > 0 {
                        f.write_str(":")?;
                    }
                    list.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

impl TryFrom<String> for CpuPinning {
    type Error = PinningError;
    fn try_from(mask: String) -> Result<Self, PinningError> {
        mask.parse()
    }
}

impl From<CpuPinning> for String {
    fn from(pinning: CpuPinning) -> String {
        pinning.to_string()
    }
}

impl CpuPinning {
    /// The CPUs of vCPU `index`.
    pub fn for_vcpu(&self, index: usize) -> Option<&CpuList> {
        match self {
            CpuPinning::All(list) => Some(list),
            CpuPinning::PerVcpu(lists) => lists.get(index),
        }
    }

    /// Whether it restricts anything at all (`all` and `all:all` don't).
    pub fn restricts(&self) -> bool {
        match self {
            CpuPinning::All(list) => !list.is_any(),
            CpuPinning::PerVcpu(lists) => lists.iter().any(|l| !l.is_any()),
        }
    }

    /// Checks the entries against the instance's vCPU count. Pure.
    pub fn check_vcpus(&self, vcpus: u32) -> Result<(), PinningError> {
        match self {
            CpuPinning::PerVcpu(lists) if lists.len() != vcpus as usize => {
                Err(PinningError::EntryCount {
                    mask: self.to_string(),
                    entries: lists.len(),
                    vcpus,
                })
            }
            _ => Ok(()),
        }
    }

    /// Checks that every CPU named exists on a host with `host_cpus`
    /// CPUs. Pure.
    pub fn check_host(&self, host_cpus: u32) -> Result<(), PinningError> {
        let lists = match self {
            CpuPinning::All(list) => std::slice::from_ref(list),
            CpuPinning::PerVcpu(lists) => lists.as_slice(),
        };
        let highest = lists.iter().filter_map(|l| l.0.last()).max();
        match highest {
            Some(&cpu) if cpu >= host_cpus => Err(PinningError::NoSuchCpu {
                mask: self.to_string(),
                cpu,
                last: host_cpus.saturating_sub(1),
            }),
            _ => Ok(()),
        }
    }
}

/// The host's CPU count as the kernel configured it, which bounds the
/// CPU numbers a mask may name (not this process's own affinity).
pub fn host_cpu_count() -> u32 {
    sysconf(SysconfVar::_NPROCESSORS_CONF)
        .ok()
        .flatten()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn list(cpus: &[u32]) -> CpuList {
        CpuList(cpus.iter().copied().collect())
    }

    #[test]
    fn masks_parse_in_ganeti_syntax() {
        assert_eq!("all".parse(), Ok(CpuPinning::All(CpuList::default())));
        assert_eq!("0-2,5".parse(), Ok(CpuPinning::All(list(&[0, 1, 2, 5]))));
        assert_eq!(
            "1:0:all:2-3".parse(),
            Ok(CpuPinning::PerVcpu(vec![
                list(&[1]),
                list(&[0]),
                CpuList::default(),
                list(&[2, 3])
            ]))
        );
    }

    #[test]
    fn masks_print_back_in_canonical_form() {
        for (given, canonical) in [
            ("all", "all"),
            ("3,0-1,2", "0-3"),
            ("0,2,4-5", "0,2,4-5"),
            ("1:0", "1:0"),
            ("all:7", "all:7"),
        ] {
            let pinning: CpuPinning = given.parse().unwrap();
            assert_eq!(pinning.to_string(), canonical);
            assert_eq!(canonical.parse::<CpuPinning>().unwrap(), pinning);
        }
    }

    #[test]
    fn bad_masks_are_refused() {
        for bad in ["", "x", "1-", "-1", "3-1", "1,,2", "0::1", "all-2", "99999"] {
            assert!(
                matches!(bad.parse::<CpuPinning>(), Err(PinningError::Syntax { .. })),
                "{bad:?} was accepted"
            );
        }
        assert!("0,".repeat(3000).parse::<CpuPinning>().is_err());
    }

    #[test]
    fn per_vcpu_masks_need_one_entry_per_vcpu() {
        let pinning: CpuPinning = "0:1".parse().unwrap();
        assert_eq!(pinning.check_vcpus(2), Ok(()));
        assert!(matches!(
            pinning.check_vcpus(3),
            Err(PinningError::EntryCount {
                entries: 2,
                vcpus: 3,
                ..
            })
        ));
        let all: CpuPinning = "0-1".parse().unwrap();
        assert_eq!(all.check_vcpus(8), Ok(()));
    }

    #[test]
    fn masks_may_only_name_host_cpus() {
        let pinning: CpuPinning = "0:3".parse().unwrap();
        assert_eq!(pinning.check_host(4), Ok(()));
        assert!(matches!(
            pinning.check_host(2),
            Err(PinningError::NoSuchCpu {
                cpu: 3,
                last: 1,
                ..
            })
        ));
        assert_eq!("all".parse::<CpuPinning>().unwrap().check_host(1), Ok(()));
    }

    #[test]
    fn only_real_masks_restrict() {
        assert!(!"all".parse::<CpuPinning>().unwrap().restricts());
        assert!(!"all:all".parse::<CpuPinning>().unwrap().restricts());
        assert!("all:1".parse::<CpuPinning>().unwrap().restricts());
    }

    #[test]
    fn pinning_is_stored_as_its_mask() {
        let pinning: CpuPinning = "1:0-1".parse().unwrap();
        let stored = serde_json::to_value(&pinning).unwrap();
        assert_eq!(stored, json!("1:0-1"));
        assert_eq!(
            serde_json::from_value::<CpuPinning>(stored).unwrap(),
            pinning
        );
        assert!(serde_json::from_value::<CpuPinning>(json!("1-0")).is_err());
    }
}
