//! The API's stability rules, checked: the proto against the released
//! descriptors in proto/baseline, by the rules of buf's FILE category that
//! break generated code or the wire. Nothing released is renamed,
//! renumbered, retyped or removed; a removed field or enum value must
//! have its number and name reserved.
//!
//! A deliberate new baseline (a release that adds to the API):
//! `KVM_AGENT_PROTO_BASELINE=update cargo test -p kvm-agent-proto`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet, ServiceDescriptorProto,
};

fn baseline_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("baseline/kvmagent.v1.binpb")
}

/// The current descriptors, without comments and source positions: a
/// comment's change is no change to the API.
fn current() -> FileDescriptorSet {
    let mut set = FileDescriptorSet::decode(kvm_agent_proto::v1::FILE_DESCRIPTOR_SET)
        .expect("the built descriptor set decodes");
    for file in &mut set.file {
        file.source_code_info = None;
    }
    set
}

/// Everything that breaks between `old` and `new`, one line each.
fn breaking_changes(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let mut found = Vec::new();
    let new_files: BTreeMap<_, _> = new.file.iter().map(|f| (f.name(), f)).collect();
    for old_file in &old.file {
        match new_files.get(old_file.name()) {
            None => found.push(format!("file {} was removed", old_file.name())),
            Some(new_file) => compare_files(old_file, new_file, &mut found),
        }
    }
    found
}

fn compare_files(old: &FileDescriptorProto, new: &FileDescriptorProto, found: &mut Vec<String>) {
    if old.package() != new.package() {
        found.push(format!(
            "{}: package {} became {}",
            old.name(),
            old.package(),
            new.package()
        ));
    }
    let prefix = old.package().to_owned();
    compare_messages(&prefix, &old.message_type, &new.message_type, found);
    compare_enums(&prefix, &old.enum_type, &new.enum_type, found);
    let services: BTreeMap<_, _> = new.service.iter().map(|s| (s.name(), s)).collect();
    for service in &old.service {
        let name = format!("{prefix}.{}", service.name());
        match services.get(service.name()) {
            None => found.push(format!("service {name} was removed")),
            Some(new_service) => compare_services(&name, service, new_service, found),
        }
    }
}

fn compare_services(
    name: &str,
    old: &ServiceDescriptorProto,
    new: &ServiceDescriptorProto,
    found: &mut Vec<String>,
) {
    let methods: BTreeMap<_, _> = new.method.iter().map(|m| (m.name(), m)).collect();
    for method in &old.method {
        let Some(now) = methods.get(method.name()) else {
            found.push(format!("method {name}.{} was removed", method.name()));
            continue;
        };
        let shape = |m: &prost_types::MethodDescriptorProto| {
            (
                m.input_type().to_owned(),
                m.output_type().to_owned(),
                m.client_streaming(),
                m.server_streaming(),
            )
        };
        if shape(method) != shape(now) {
            found.push(format!(
                "method {name}.{} changed its request, response or streaming: {:?} became {:?}",
                method.name(),
                shape(method),
                shape(now)
            ));
        }
    }
}

fn compare_messages(
    prefix: &str,
    old: &[DescriptorProto],
    new: &[DescriptorProto],
    found: &mut Vec<String>,
) {
    let by_name: BTreeMap<_, _> = new.iter().map(|m| (m.name(), m)).collect();
    for message in old {
        let name = format!("{prefix}.{}", message.name());
        let Some(now) = by_name.get(message.name()) else {
            found.push(format!("message {name} was removed"));
            continue;
        };
        compare_fields(&name, message, now, found);
        compare_messages(&name, &message.nested_type, &now.nested_type, found);
        compare_enums(&name, &message.enum_type, &now.enum_type, found);
    }
}

/// A field as the wire and generated code see it: name, type, label,
/// message or enum type, oneof, JSON name and explicit presence.
type FieldShape = (String, i32, i32, String, Option<i32>, String, bool);

fn field_shape(f: &FieldDescriptorProto) -> FieldShape {
    (
        f.name().to_owned(),
        f.r#type() as i32,
        f.label() as i32,
        f.type_name().to_owned(),
        f.oneof_index,
        f.json_name().to_owned(),
        f.proto3_optional(),
    )
}

fn compare_fields(
    name: &str,
    old: &DescriptorProto,
    new: &DescriptorProto,
    found: &mut Vec<String>,
) {
    let by_number: BTreeMap<_, _> = new.field.iter().map(|f| (f.number(), f)).collect();
    for field in &old.field {
        let number = field.number();
        match by_number.get(&number) {
            Some(now) if field_shape(field) != field_shape(now) => found.push(format!(
                "field {name}.{} (number {number}) changed: {:?} became {:?}",
                field.name(),
                field_shape(field),
                field_shape(now)
            )),
            Some(_) => {}
            None => {
                let number_reserved = new
                    .reserved_range
                    .iter()
                    .any(|r| (r.start()..r.end()).contains(&number));
                let name_reserved = new.reserved_name.iter().any(|n| n == field.name());
                if !(number_reserved && name_reserved) {
                    found.push(format!(
                        "field {name}.{} (number {number}) was removed without reserving its number and name",
                        field.name()
                    ));
                }
            }
        }
    }
}

fn compare_enums(
    prefix: &str,
    old: &[EnumDescriptorProto],
    new: &[EnumDescriptorProto],
    found: &mut Vec<String>,
) {
    let by_name: BTreeMap<_, _> = new.iter().map(|e| (e.name(), e)).collect();
    for enumeration in old {
        let name = format!("{prefix}.{}", enumeration.name());
        let Some(now) = by_name.get(enumeration.name()) else {
            found.push(format!("enum {name} was removed"));
            continue;
        };
        let values: BTreeMap<_, _> = now.value.iter().map(|v| (v.number(), v.name())).collect();
        for value in &enumeration.value {
            let number = value.number();
            match values.get(&number) {
                Some(&now_name) if now_name != value.name() => found.push(format!(
                    "enum value {name}.{} (number {number}) was renamed {now_name}",
                    value.name()
                )),
                Some(_) => {}
                None => {
                    // Enum reserved ranges include their end.
                    let number_reserved = now
                        .reserved_range
                        .iter()
                        .any(|r| (r.start()..=r.end()).contains(&number));
                    let name_reserved = now.reserved_name.iter().any(|n| n == value.name());
                    if !(number_reserved && name_reserved) {
                        found.push(format!(
                            "enum value {name}.{} (number {number}) was removed without reserving its number and name",
                            value.name()
                        ));
                    }
                }
            }
        }
    }
}

#[test]
fn the_api_changes_only_compatibly() {
    let current = current();
    if std::env::var("KVM_AGENT_PROTO_BASELINE").as_deref() == Ok("update") {
        std::fs::write(baseline_path(), current.encode_to_vec()).expect("write the baseline");
        return;
    }
    let bytes = std::fs::read(baseline_path()).expect("proto/baseline holds the released API");
    let baseline = FileDescriptorSet::decode(bytes.as_slice()).expect("the baseline decodes");

    let found = breaking_changes(&baseline, &current);

    assert!(
        found.is_empty(),
        "the proto breaks the released API (proto/baseline); add instead, or \
         reserve what is removed:\n  {}",
        found.join("\n  ")
    );
}

fn message<'a>(set: &'a mut FileDescriptorSet, name: &str) -> &'a mut DescriptorProto {
    set.file[0]
        .message_type
        .iter_mut()
        .find(|m| m.name() == name)
        .expect("message exists")
}

#[test]
fn a_renamed_field_breaks() {
    let old = current();
    let mut new = old.clone();
    message(&mut new, "GetInstanceRequest").field[0].name = Some("instance".into());

    let found = breaking_changes(&old, &new);

    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("GetInstanceRequest.name"), "{found:?}");
}

#[test]
fn a_removed_field_breaks_unless_reserved() {
    let old = current();
    let mut new = old.clone();
    let request = message(&mut new, "StopInstanceRequest");
    request.field.retain(|f| f.name() != "force");

    assert_eq!(breaking_changes(&old, &new).len(), 1);

    let request = message(&mut new, "StopInstanceRequest");
    request
        .reserved_range
        .push(prost_types::descriptor_proto::ReservedRange {
            start: Some(2),
            end: Some(3),
        });
    request.reserved_name.push("force".into());

    assert_eq!(breaking_changes(&old, &new), Vec::<String>::new());
}

#[test]
fn a_removed_method_or_enum_value_or_retyped_field_breaks() {
    let old = current();
    let mut new = old.clone();
    new.file[0].service[0]
        .method
        .retain(|m| m.name() != "GetNodeInfo");
    new.file[0].enum_type[0].value.pop();
    message(&mut new, "SetMemoryRequest").field[1].r#type = Some(13);

    let found = breaking_changes(&old, &new);

    assert_eq!(found.len(), 3, "{found:?}");
}

#[test]
fn an_added_field_does_not_break() {
    let old = current();
    let mut new = old.clone();
    let mut field = message(&mut new, "GetInstanceRequest").field[0].clone();
    field.name = Some("extra".into());
    field.json_name = Some("extra".into());
    field.number = Some(2);
    message(&mut new, "GetInstanceRequest").field.push(field);

    assert_eq!(breaking_changes(&old, &new), Vec::<String>::new());
}
