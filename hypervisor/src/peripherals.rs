//! Guest-only devices that take no part in hotplug and reach nothing on
//! the host: the display adapter, USB input devices and the sound card.
//! Pure: what each is called in QEMU.

use serde::{Deserialize, Serialize};

/// A pointing device on USB, for VNC consoles: a tablet's absolute
/// coordinates keep the guest's pointer where the viewer's is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsbPointer {
    /// `usb-tablet`.
    Tablet,
    /// `usb-mouse`.
    Mouse,
}

impl UsbPointer {
    /// QEMU's device.
    pub fn qemu_device(self) -> &'static str {
        match self {
            UsbPointer::Tablet => "usb-tablet",
            UsbPointer::Mouse => "usb-mouse",
        }
    }
}

/// The display adapter, in slot 2 (reserved for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisplayAdapter {
    /// QEMU's standard VGA.
    Std,
    /// Cirrus Logic GD5446.
    Cirrus,
    /// VMware SVGA.
    Vmware,
    /// QXL.
    Qxl,
    /// virtio-gpu with VGA compatibility.
    Virtio,
    /// No display adapter at all.
    None,
}

impl DisplayAdapter {
    /// QEMU's device; `None` for no adapter.
    pub fn qemu_device(self) -> Option<&'static str> {
        match self {
            DisplayAdapter::Std => Some("VGA"),
            DisplayAdapter::Cirrus => Some("cirrus-vga"),
            DisplayAdapter::Vmware => Some("vmware-svga"),
            DisplayAdapter::Qxl => Some("qxl-vga"),
            DisplayAdapter::Virtio => Some("virtio-vga"),
            DisplayAdapter::None => None,
        }
    }
}

/// A USB input device beside the pointer: Ganeti's `usb_devices`, the
/// ones QEMU emulates without anything of the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UsbDevice {
    /// `usb-kbd`.
    Keyboard,
    /// `usb-mouse`.
    Mouse,
    /// `usb-tablet`.
    Tablet,
    /// `usb-wacom-tablet`.
    WacomTablet,
}

impl UsbDevice {
    /// QEMU's device.
    pub fn qemu_device(self) -> &'static str {
        match self {
            UsbDevice::Keyboard => "usb-kbd",
            UsbDevice::Mouse => "usb-mouse",
            UsbDevice::Tablet => "usb-tablet",
            UsbDevice::WacomTablet => "usb-wacom-tablet",
        }
    }
}

/// A sound card, for guests that want one. Its sound goes nowhere: the
/// node has no audio for guests (QEMU's `none` audio backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SoundCard {
    /// Intel HD Audio with a duplex codec; on PCI.
    Hda,
    /// Intel 82801AA AC97; on PCI.
    Ac97,
    /// ENSONIQ AudioPCI ES1370; on PCI.
    Es1370,
    /// Creative Sound Blaster 16; on ISA.
    Sb16,
    /// Yamaha YM3812 (OPL2) AdLib; on ISA.
    Adlib,
    /// Gravis Ultrasound GF1; on ISA.
    Gus,
    /// Crystal Semiconductor CS4231A; on ISA.
    Cs4231a,
    /// The PC speaker, which every PC has.
    Pcspk,
}

/// QEMU id of the audio backend that sound cards play into.
pub const AUDIO_BACKEND_ID: &str = "audio0";

impl SoundCard {
    /// Whether the card takes a PCI slot.
    pub fn on_pci(self) -> bool {
        matches!(self, SoundCard::Hda | SoundCard::Ac97 | SoundCard::Es1370)
    }

    /// The options that give the guest the card: `pci_at` is its
    /// `bus=...,addr=...`, for a card on PCI. Pure.
    pub fn render(self, pci_at: Option<&str>) -> Vec<String> {
        let at = pci_at.map(|at| format!(",{at}")).unwrap_or_default();
        let audio = format!("audiodev={AUDIO_BACKEND_ID}");
        let mut argv = vec!["-audiodev".into(), format!("none,id={AUDIO_BACKEND_ID}")];
        let devices: Vec<String> = match self {
            SoundCard::Hda => vec![
                format!("intel-hda,id=sound0{at}"),
                format!("hda-duplex,bus=sound0.0,{audio}"),
            ],
            SoundCard::Ac97 => vec![format!("AC97,id=sound0,{audio}{at}")],
            SoundCard::Es1370 => vec![format!("ES1370,id=sound0,{audio}{at}")],
            SoundCard::Sb16 => vec![format!("sb16,id=sound0,{audio}")],
            SoundCard::Adlib => vec![format!("adlib,id=sound0,{audio}")],
            SoundCard::Gus => vec![format!("gus,id=sound0,{audio}")],
            SoundCard::Cs4231a => vec![format!("cs4231a,id=sound0,{audio}")],
            SoundCard::Pcspk => {
                argv.extend([
                    "-machine".into(),
                    format!("pcspk-audiodev={AUDIO_BACKEND_ID}"),
                ]);
                vec![]
            }
        };
        for device in devices {
            argv.extend(["-device".into(), device]);
        }
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pci_card_takes_its_slot_and_an_isa_card_none() {
        assert_eq!(
            SoundCard::Hda.render(Some("bus=pci.0,addr=0x7")),
            [
                "-audiodev",
                "none,id=audio0",
                "-device",
                "intel-hda,id=sound0,bus=pci.0,addr=0x7",
                "-device",
                "hda-duplex,bus=sound0.0,audiodev=audio0",
            ]
        );
        assert_eq!(
            SoundCard::Sb16.render(None)[3],
            "sb16,id=sound0,audiodev=audio0"
        );
        assert_eq!(
            SoundCard::Pcspk.render(None)[2..],
            ["-machine", "pcspk-audiodev=audio0"]
        );
        assert!(SoundCard::Es1370.on_pci() && !SoundCard::Gus.on_pci());
    }
}
