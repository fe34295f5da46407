//! API messages as the command line shows them, read through the API's own
//! descriptors: JSON with the proto field names, and enum values as the
//! lowercase word people type (`INSTANCE_STATE_RUNNING` is `running`).
//!
//! The JSON is built here rather than by serde on the generated types so
//! that enums are words and 64-bit numbers stay numbers (the canonical
//! proto JSON mapping makes them strings), and so that every field is
//! present, defaults included, as scripts expect.

use std::sync::LazyLock;

use kvm_agent_proto::v1 as pb;
use prost_reflect::{DescriptorPool, DynamicMessage, EnumDescriptor, Kind, MapKey, ReflectMessage};
use serde_json::{Map, Value};

/// The package every API type is in.
const PACKAGE: &str = "kvmagent.v1";

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("the API's descriptors decode")
});

/// An API message the command line prints, named as in the descriptors.
pub(super) trait ApiMessage: prost::Message {
    /// The message's name in the `kvmagent.v1` package.
    const NAME: &'static str;
}

macro_rules! api_messages {
    ($($name:ident),* $(,)?) => {
        $(impl ApiMessage for pb::$name {
            const NAME: &'static str = stringify!($name);
        })*
    };
}

api_messages!(
    CancelMigrationResponse,
    ConsoleInfo,
    DeleteInstanceResponse,
    DeviceInfo,
    Event,
    GanetiAdoption,
    GuestAgentResponse,
    HotplugSupportResponse,
    InstanceInfo,
    MigrationProgress,
    NodeInfo,
    RestoreInstanceResponse,
    SaveInstanceResponse,
    SetMemoryResponse,
    SetDisplayPasswordResponse,
    StopInstanceResponse,
    SwitchToPostcopyResponse,
);

/// The message's fields as a JSON object: every field by its proto name,
/// an unset message field as null.
pub(super) fn to_json<M: ApiMessage>(message: &M) -> Value {
    let descriptor = POOL
        .get_message_by_name(&format!("{PACKAGE}.{}", M::NAME))
        .unwrap_or_else(|| panic!("{} is not in the API's descriptors", M::NAME));
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message decodes as its own type");
    message_json(&dynamic)
}

fn message_json(message: &DynamicMessage) -> Value {
    let descriptor = message.descriptor();
    let fields = descriptor.fields().map(|field| {
        let value = if field.supports_presence() && !message.has_field(&field) {
            Value::Null
        } else {
            value_json(&message.get_field(&field), &field.kind())
        };
        (field.name().to_owned(), value)
    });
    Value::Object(fields.collect())
}

fn value_json(value: &prost_reflect::Value, kind: &Kind) -> Value {
    use prost_reflect::Value as V;
    match value {
        V::Bool(b) => Value::from(*b),
        V::I32(n) => Value::from(*n),
        V::I64(n) => Value::from(*n),
        V::U32(n) => Value::from(*n),
        V::U64(n) => Value::from(*n),
        V::F32(x) => Value::from(*x),
        V::F64(x) => Value::from(*x),
        V::String(s) => Value::from(s.as_str()),
        V::Bytes(b) => Value::from(b.to_vec()),
        V::EnumNumber(n) => match kind.as_enum() {
            Some(descriptor) => Value::from(label(descriptor, *n)),
            None => Value::from(*n),
        },
        V::Message(m) => message_json(m),
        V::List(items) => items.iter().map(|v| value_json(v, kind)).collect(),
        V::Map(entries) => {
            let value_kind = kind
                .as_message()
                .map(|entry| entry.map_entry_value_field().kind());
            let entries = entries.iter().map(|(key, v)| {
                let v = match &value_kind {
                    Some(k) => value_json(v, k),
                    None => Value::Null,
                };
                (map_key(key), v)
            });
            Value::Object(entries.collect::<Map<_, _>>())
        }
    }
}

fn map_key(key: &MapKey) -> String {
    match key {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

/// An API enum by its name in the `kvmagent.v1` package.
pub(super) fn enum_type(name: &str) -> EnumDescriptor {
    POOL.get_enum_by_name(&format!("{PACKAGE}.{name}"))
        .unwrap_or_else(|| panic!("{name} is not in the API's descriptors"))
}

/// The prefix every value name of the enum carries, as protobuf style
/// asks: `InstanceState` → `INSTANCE_STATE_`.
pub(super) fn value_prefix(descriptor: &EnumDescriptor) -> String {
    let mut prefix = String::new();
    for (i, c) in descriptor.name().chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            prefix.push('_');
        }
        prefix.push(c.to_ascii_uppercase());
    }
    prefix.push('_');
    prefix
}

/// An enum value as people read and type it: its name without the
/// prefix, in lowercase; a number this build doesn't know stays a number.
pub(super) fn label(descriptor: &EnumDescriptor, number: i32) -> String {
    match descriptor.get_value(number) {
        Some(value) => {
            let prefix = value_prefix(descriptor);
            let name = value.name();
            name.strip_prefix(prefix.as_str())
                .unwrap_or(name)
                .to_lowercase()
        }
        None => number.to_string(),
    }
}

/// The label of an `InstanceState`.
pub(super) fn state_label(state: i32) -> String {
    label(&enum_type("InstanceState"), state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printed_message_is_in_the_descriptors() {
        fn check<M: ApiMessage + Default>() {
            assert!(to_json(&M::default()).is_object(), "{}", M::NAME);
        }
        check::<pb::CancelMigrationResponse>();
        check::<pb::SwitchToPostcopyResponse>();
        check::<pb::ConsoleInfo>();
        check::<pb::DeviceInfo>();
        check::<pb::Event>();
        check::<pb::GanetiAdoption>();
        check::<pb::HotplugSupportResponse>();
        check::<pb::InstanceInfo>();
        check::<pb::MigrationProgress>();
        check::<pb::NodeInfo>();
        check::<pb::RestoreInstanceResponse>();
        check::<pb::SaveInstanceResponse>();
        check::<pb::SetMemoryResponse>();
        check::<pb::StopInstanceResponse>();
    }

    #[test]
    fn fields_keep_their_proto_names_and_enums_read_as_words() {
        let info = pb::InstanceInfo {
            name: "web".into(),
            state: pb::InstanceState::Running as i32,
            uptime_seconds: u64::MAX,
            devices: vec![pb::DeviceInfo {
                kind: pb::DeviceKind::Nic as i32,
                pci_slot: 3,
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = to_json(&info);
        assert_eq!(json["name"], "web");
        assert_eq!(json["state"], "running");
        assert_eq!(json["uptime_seconds"], u64::MAX, "a number, not a string");
        assert_eq!(json["state_detail"], "", "defaults are shown");
        assert_eq!(json["devices"][0]["kind"], "nic");
        assert_eq!(json["devices"][0]["pci_slot"], 3);
    }

    #[test]
    fn an_unset_message_is_null_and_an_unknown_enum_a_number() {
        let stop = pb::StopInstanceResponse {
            instance: None,
            method: 99,
        };
        let json = to_json(&stop);
        assert_eq!(json["instance"], Value::Null);
        assert_eq!(json["method"], "99");
    }

    #[test]
    fn prefixes_follow_the_enum_names() {
        assert_eq!(value_prefix(&enum_type("InstanceState")), "INSTANCE_STATE_");
        assert_eq!(label(&enum_type("StopMethod"), 1), "already_stopped");
        assert_eq!(
            state_label(pb::InstanceState::Quarantined as i32),
            "quarantined"
        );
    }
}
