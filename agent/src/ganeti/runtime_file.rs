//! The runtime file Ganeti's KVM driver keeps per running instance
//! (`conf/<name>.runtime`): a JSON list `[kvm_cmd, nics, up_hvp, disks]`.
//! Pure.
//!
//! Files written before Ganeti 2.16 place NICs and disks with a `pci` slot
//! instead of `hvinfo`; they are read the way Ganeti's own upgrade step
//! reads them, so the ids match what that Ganeti gave QEMU.

use serde_json::{Map, Value};
use uuid::Uuid;

/// The largest runtime file read; Ganeti's are a few kilobytes.
pub const MAX_RUNTIME_FILE: u64 = 1 << 20;

/// Where a device sits, as Ganeti's `hvinfo` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HvInfo {
    /// QEMU driver, e.g. `virtio-net-pci`.
    pub driver: String,
    /// QEMU id (device, and netdev or drive).
    pub id: String,
    /// Bus, e.g. `pci.0`.
    pub bus: String,
    /// Slot on that bus.
    pub slot: u8,
}

/// A NIC of the runtime file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GanetiNic {
    /// Ganeti's uuid of the NIC.
    pub uuid: Uuid,
    /// Ganeti's name, if any.
    pub name: Option<String>,
    /// MAC address as Ganeti wrote it.
    pub mac: String,
    /// `nicparams.mode`: bridged, routed or openvswitch.
    pub mode: String,
    /// `nicparams.link`: the bridge of a bridged NIC.
    pub link: String,
    /// `nicparams.vlan`, empty without VLANs.
    pub vlan: String,
    /// Where it sits.
    pub hvinfo: HvInfo,
}

/// A disk of the runtime file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GanetiDisk {
    /// Ganeti's uuid of the disk.
    pub uuid: Uuid,
    /// Ganeti's name, if any.
    pub name: Option<String>,
    /// `rw` or `ro`.
    pub mode: String,
    /// Ganeti's disk template of the disk, e.g. `plain` or `drbd`.
    pub dev_type: String,
    /// The path QEMU opened: the block device link Ganeti made.
    pub link: String,
    /// Where it sits.
    pub hvinfo: HvInfo,
}

/// A runtime file, read and upgraded.
#[derive(Debug, Clone, PartialEq)]
pub struct GanetiRuntime {
    /// The command line without NICs, disks and monitors.
    pub kvm_cmd: Vec<String>,
    /// NICs in Ganeti's order.
    pub nics: Vec<GanetiNic>,
    /// The hypervisor parameters at start.
    pub hvparams: Map<String, Value>,
    /// Disks in Ganeti's order.
    pub disks: Vec<GanetiDisk>,
}

/// Ganeti's default for `kvm_pci_reservations`.
pub const DEFAULT_PCI_RESERVATIONS: u8 = 12;

impl GanetiRuntime {
    /// Reads a runtime file's text. Pure.
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| format!("it is not complete JSON ({e}); Ganeti may be writing it"))?;
        let Some(parts) = value.as_array().filter(|p| (3..=4).contains(&p.len())) else {
            return Err("it is not the list [kvm_cmd, nics, hvparams, disks]".into());
        };
        // Ganeti writes some arguments as numbers (`-m 128`).
        let kvm_cmd = parts[0]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .ok_or("its kvm_cmd is not a list of strings")?;
        let hvparams = parts[2]
            .as_object()
            .cloned()
            .ok_or("its hvparams are not an object")?;
        let nic_type = string_param(&hvparams, "nic_type");
        let disk_type = string_param(&hvparams, "disk_type");
        let nics = list(&parts[1], "nics")?
            .iter()
            .enumerate()
            .map(|(index, nic)| read_nic(nic, index, &nic_type))
            .collect::<Result<_, String>>()?;
        let disks = match parts.get(3) {
            None => Vec::new(),
            Some(disks) => list(disks, "disks")?
                .iter()
                .enumerate()
                .map(|(index, entry)| read_disk(entry, index, &disk_type))
                .collect::<Result<_, String>>()?,
        };
        Ok(GanetiRuntime {
            kvm_cmd,
            nics,
            hvparams,
            disks,
        })
    }

    /// A hypervisor parameter as text ("" when unset).
    pub fn param(&self, key: &str) -> String {
        match self.hvparams.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        }
    }

    /// Slots on pci.0 that Ganeti keeps for QEMU's own devices.
    pub fn pci_reservations(&self) -> u8 {
        self.hvparams
            .get("kvm_pci_reservations")
            .and_then(Value::as_u64)
            .and_then(|n| u8::try_from(n).ok())
            .unwrap_or(DEFAULT_PCI_RESERVATIONS)
    }
}

fn list<'a>(value: &'a Value, what: &str) -> Result<&'a Vec<Value>, String> {
    value
        .as_array()
        .ok_or_else(|| format!("its {what} are not a list"))
}

fn string_param(hvparams: &Map<String, Value>, key: &str) -> String {
    hvparams
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or("paravirtual")
        .to_owned()
}

fn field<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object.get(key).and_then(Value::as_str)
}

fn read_nic(nic: &Value, index: usize, nic_type: &str) -> Result<GanetiNic, String> {
    let what = format!("NIC {index}");
    let mac = field(nic, "mac").ok_or_else(|| format!("{what} has no MAC"))?;
    // NICs from before Ganeti 2.8 have no uuid; one is made from the MAC,
    // the same every time the file is read.
    let uuid = match field(nic, "uuid") {
        Some(u) => u
            .parse()
            .map_err(|_| format!("{what} has a bad uuid {u:?}"))?,
        None => uuid_of_mac(mac).ok_or_else(|| format!("{what} has a bad MAC {mac:?}"))?,
    };
    let params = nic.get("nicparams");
    let param = |key| params.and_then(|p| field(p, key)).unwrap_or("").to_owned();
    Ok(GanetiNic {
        uuid,
        name: field(nic, "name").map(str::to_owned),
        mac: mac.to_owned(),
        mode: param("mode"),
        link: param("link"),
        vlan: param("vlan"),
        hvinfo: hvinfo(nic, "nic", uuid, &nic_device(nic_type), &what)?,
    })
}

/// A uuid for a NIC that has none: a fixed first part, then its MAC.
fn uuid_of_mac(mac: &str) -> Option<Uuid> {
    let mac: hypervisor::spec::MacAddr = mac.parse().ok()?;
    let mut bytes = *b"ganeti-nic\0\0\0\0\0\0";
    bytes[10..].copy_from_slice(&mac.0);
    Some(Uuid::from_bytes(bytes))
}

fn read_disk(entry: &Value, index: usize, disk_type: &str) -> Result<GanetiDisk, String> {
    let what = format!("disk {index}");
    let (disk, link) = match entry.as_array().map(Vec::as_slice) {
        Some([disk, link, ..]) => (disk, link.as_str()),
        _ => return Err(format!("{what} is not a [disk, link, uri] entry")),
    };
    let link = link.ok_or_else(|| format!("{what} has no link"))?;
    let uuid = field(disk, "uuid")
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| format!("{what} has no uuid"))?;
    Ok(GanetiDisk {
        uuid,
        name: field(disk, "name").map(str::to_owned),
        mode: field(disk, "mode").unwrap_or("rw").to_owned(),
        dev_type: field(disk, "dev_type").unwrap_or_default().to_owned(),
        link: link.to_owned(),
        hvinfo: hvinfo(disk, "disk", uuid, &disk_device(disk_type), &what)?,
    })
}

/// A device's `hvinfo`, or the one Ganeti's upgrade makes from `pci`.
fn hvinfo(
    device: &Value,
    kind: &str,
    uuid: Uuid,
    driver: &str,
    what: &str,
) -> Result<HvInfo, String> {
    if let Some(info) = device.get("hvinfo").filter(|i| i.get("id").is_some()) {
        let text = |key| field(info, key).map(str::to_owned);
        let addr = text("addr").ok_or_else(|| {
            format!("{what} is not on a PCI slot (hvinfo {info}); only PCI devices can be adopted")
        })?;
        let slot = u8::from_str_radix(addr.trim_start_matches("0x"), 16)
            .map_err(|_| format!("{what} has a bad PCI address {addr:?}"))?;
        return Ok(HvInfo {
            driver: text("driver").ok_or_else(|| format!("{what} has no driver"))?,
            id: text("id").unwrap_or_default(),
            bus: text("bus").unwrap_or_default(),
            slot,
        });
    }
    let Some(slot) = device.get("pci").and_then(Value::as_u64) else {
        return Err(format!(
            "{what} has neither hvinfo nor a PCI slot: QEMU placed it where it chose, so it can't be placed the same way again"
        ));
    };
    let slot = u8::try_from(slot).map_err(|_| format!("{what} has a bad PCI slot {slot}"))?;
    let first = uuid.to_string();
    let first = first.split('-').next().unwrap_or_default();
    Ok(HvInfo {
        driver: driver.to_owned(),
        id: format!("hot{kind}-{first}-pci-{slot}"),
        bus: "pci.0".into(),
        slot,
    })
}

/// The QEMU driver of Ganeti's `nic_type`.
fn nic_device(nic_type: &str) -> String {
    match nic_type {
        "paravirtual" => "virtio-net-pci".into(),
        other => other.into(),
    }
}

/// The QEMU driver of Ganeti's `disk_type`.
fn disk_device(disk_type: &str) -> String {
    match disk_type {
        "paravirtual" => "virtio-blk-pci".into(),
        other => other.into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    /// A runtime file as Ganeti 3.0 writes it: a bridged NIC and a disk.
    pub(crate) fn sample() -> Value {
        json!([
            ["/usr/bin/kvm", "-name", "web1", "-m", 128],
            [{
                "mac": "aa:00:00:12:34:56", "uuid": "5c1b2f0e-8a31-4f5e-9d7c-0123456789ab",
                "nicparams": {"mode": "bridged", "link": "br0", "vlan": ""},
                "hvinfo": {"driver": "virtio-net-pci", "id": "nic-5c1b2f0e-8a31-4f5e", "bus": "pci.0", "addr": "0xd"}
            }],
            {"nic_type": "paravirtual", "disk_type": "paravirtual"},
            [[{
                "uuid": "932df160-7a22-4067-a566-7e0ca8386133", "mode": "rw",
                "hvinfo": {"driver": "virtio-blk-pci", "id": "disk-932df160-7a22-4067", "bus": "pci.0", "addr": "0xc"}
            }, "/var/run/ganeti/instance-disks/web1:0", null]]
        ])
    }

    #[test]
    fn a_current_file_is_read_with_its_slots_and_ids() {
        let rt = GanetiRuntime::parse(&sample().to_string()).unwrap();
        assert_eq!(rt.kvm_cmd[4], "128");
        assert_eq!(rt.nics[0].hvinfo.id, "nic-5c1b2f0e-8a31-4f5e");
        assert_eq!(rt.nics[0].hvinfo.slot, 13);
        assert_eq!(rt.nics[0].link, "br0");
        assert_eq!(rt.disks[0].hvinfo.slot, 12);
        assert_eq!(rt.disks[0].link, "/var/run/ganeti/instance-disks/web1:0");
        assert_eq!(rt.pci_reservations(), DEFAULT_PCI_RESERVATIONS);
    }

    #[test]
    fn a_file_from_before_2_16_gets_ganetis_upgraded_ids() {
        let mut value = sample();
        value[1][0].as_object_mut().unwrap().remove("hvinfo");
        value[1][0]["pci"] = json!(5);
        let rt = GanetiRuntime::parse(&value.to_string()).unwrap();
        let nic = &rt.nics[0].hvinfo;
        assert_eq!(nic.id, "hotnic-5c1b2f0e-pci-5");
        assert_eq!(nic.driver, "virtio-net-pci");
        assert_eq!((nic.bus.as_str(), nic.slot), ("pci.0", 5));
    }

    #[test]
    fn broken_files_are_refused_with_the_reason() {
        let text = sample().to_string();
        let truncated = &text[..text.len() / 2];
        assert!(
            GanetiRuntime::parse(truncated)
                .unwrap_err()
                .contains("not complete JSON")
        );
        let mut not_an_argument = sample();
        not_an_argument[0][4] = json!({ "size": 128 });
        assert!(
            GanetiRuntime::parse(&not_an_argument.to_string())
                .unwrap_err()
                .contains("kvm_cmd")
        );
        let mut placed_by_qemu = sample();
        placed_by_qemu[1][0]
            .as_object_mut()
            .unwrap()
            .remove("hvinfo");
        assert!(
            GanetiRuntime::parse(&placed_by_qemu.to_string())
                .unwrap_err()
                .contains("neither hvinfo nor a PCI slot")
        );
    }
}
