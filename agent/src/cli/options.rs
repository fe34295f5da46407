//! The command line's one way of reading option values: API enums by
//! their word, `key=value,...` lists as `--disk` and `--nic` take them,
//! and sizes. Each knows what it accepts and says so when a value is not
//! one of them.

use std::ffi::OsStr;

use clap::builder::{PossibleValue, TypedValueParser};
use prost_reflect::EnumDescriptor;

use super::wire::{enum_type, value_prefix};

/// An API enum read from the word people type: the value's name without
/// the enum's prefix, in any case (`writeback` for `DISK_CACHE_WRITEBACK`).
#[derive(Clone)]
pub(super) struct EnumParser {
    /// What a value is, for errors: "cache mode".
    what: &'static str,
    descriptor: EnumDescriptor,
}

impl EnumParser {
    /// The parser of the `kvmagent.v1` enum `name`.
    pub(super) fn new(name: &str, what: &'static str) -> EnumParser {
        EnumParser {
            what,
            descriptor: enum_type(name),
        }
    }

    pub(super) fn parse(&self, text: &str) -> Result<i32, String> {
        // Some help texts spell words with '-' (wacom-tablet), as QEMU
        // does: both spellings are taken.
        let name = value_prefix(&self.descriptor) + &text.to_uppercase().replace('-', "_");
        match self.descriptor.get_value_by_name(&name) {
            Some(value) => Ok(value.number()),
            None => Err(format!(
                "unknown {} {text:?}; use {}",
                self.what,
                one_of(&self.choices())
            )),
        }
    }

    /// The words worth offering: every value but the unspecified one,
    /// which is still accepted and means the default.
    fn choices(&self) -> Vec<String> {
        let prefix = value_prefix(&self.descriptor);
        self.descriptor
            .values()
            .filter(|v| v.number() != 0)
            .map(|v| v.name().trim_start_matches(&prefix).to_lowercase())
            .collect()
    }
}

impl TypedValueParser for EnumParser {
    type Value = i32;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<i32, clap::Error> {
        // A plain function parser gets clap's wording: "invalid value
        // 'x' for '--cache <CACHE>': ...".
        let parser = self.clone();
        (move |text: &str| parser.parse(text)).parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(self.choices().into_iter().map(PossibleValue::new)))
    }
}

/// A `key=value,key,...` list, as `--disk` and `--nic` take it: `,,`
/// stands for a comma inside a value, and a key alone is a flag.
pub(super) struct OptionList {
    /// What the list describes, for errors: "disk".
    what: &'static str,
    items: Vec<(String, Option<String>)>,
}

impl OptionList {
    /// Splits `text`, refusing any key not in `keys`.
    pub(super) fn parse(what: &'static str, keys: &[&str], text: &str) -> Result<Self, String> {
        let items = split(text);
        if let Some((key, _)) = items.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
            return Err(format!(
                "unknown {what} option {key:?}; use {}",
                one_of(keys)
            ));
        }
        Ok(OptionList { what, items })
    }

    /// What was given for `key`: the last one when it is given twice.
    fn given(&self, key: &str) -> Option<&Option<String>> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The value of `key`, if it was given.
    pub(super) fn value(&self, key: &str) -> Result<Option<String>, String> {
        match self.given(key) {
            None => Ok(None),
            Some(None) => Err(format!(
                "{} option {key} needs a value: {key}=...",
                self.what
            )),
            Some(Some(v)) => Ok(Some(v.clone())),
        }
    }

    /// The value of `key` read with `parse`, if it was given.
    pub(super) fn parsed<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        self.value(key)?
            .map(|v| parse(&v).map_err(|e| format!("{} option {key}: {e}", self.what)))
            .transpose()
    }

    /// Whether the flag `key` is on: given alone, or as `key=on` (or
    /// true, yes, 1); `key=off` (or false, no, 0) turns it off.
    pub(super) fn flag(&self, key: &str) -> Result<bool, String> {
        match self.given(key).map(Option::as_deref) {
            None | Some(Some("off" | "false" | "no" | "0")) => Ok(false),
            Some(None | Some("" | "on" | "true" | "yes" | "1")) => Ok(true),
            Some(Some(other)) => Err(format!(
                "{} option {key} is a flag: {key}, {key}=on or {key}=off, not {other:?}",
                self.what
            )),
        }
    }
}

/// Splits `key=value,...` into its items; `,,` stands for a comma.
fn split(text: &str) -> Vec<(String, Option<String>)> {
    let mut items = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            (',', Some(',')) => {
                chars.next();
                items.last_mut().into_iter().for_each(|i| i.push(','));
            }
            (',', _) => items.push(String::new()),
            _ => items.last_mut().into_iter().for_each(|i| i.push(c)),
        }
    }
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (i, None),
        })
        .collect()
}

/// `a, b or c`.
fn one_of(words: &[impl AsRef<str>]) -> String {
    let words: Vec<&str> = words.iter().map(AsRef::as_ref).collect();
    match words.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => words.concat(),
    }
}

/// Reads `1048576`, `512K`, `100M` or `2G`.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size like 1048576, 512K, 100M or 2G"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_doubled_comma_stays_in_the_value() {
        assert_eq!(
            split("path=/srv/a,,b.img,ro"),
            vec![
                ("path".into(), Some("/srv/a,b.img".into())),
                ("ro".into(), None)
            ]
        );
    }

    #[test]
    fn enum_words_are_read_in_any_case_and_refused_with_the_choices() {
        let cache = EnumParser::new("DiskCache", "cache mode");
        assert_eq!(cache.parse("writeback"), Ok(2));
        assert_eq!(cache.parse("WriteBack"), Ok(2));
        assert_eq!(cache.parse("unspecified"), Ok(0));
        assert_eq!(
            cache.parse("fast").unwrap_err(),
            "unknown cache mode \"fast\"; use none, writeback, writethrough, directsync or unsafe"
        );
    }

    #[test]
    fn a_list_refuses_unknown_keys_and_bare_values() {
        let keys = ["path", "ro"];
        let unknown = OptionList::parse("disk", &keys, "path=/a,fast").err();
        assert_eq!(
            unknown.as_deref(),
            Some("unknown disk option \"fast\"; use path or ro")
        );
        let bare = OptionList::parse("disk", &keys, "path").unwrap();
        assert_eq!(
            bare.value("path").unwrap_err(),
            "disk option path needs a value: path=..."
        );
    }

    #[test]
    fn flags_are_on_alone_and_read_booleans() {
        let keys = ["ro", "vhost", "x"];
        let list = OptionList::parse("disk", &keys, "ro,vhost=off,x=maybe").unwrap();
        assert_eq!(list.flag("ro"), Ok(true));
        assert_eq!(list.flag("vhost"), Ok(false));
        assert!(list.flag("x").unwrap_err().contains("is a flag"));
        assert_eq!(
            OptionList::parse("disk", &keys, "ro=1").unwrap().flag("ro"),
            Ok(true)
        );
    }

    #[test]
    fn the_last_of_a_repeated_key_counts() {
        let list = OptionList::parse("nic", &["queues"], "queues=2,queues=4").unwrap();
        let queues = list.parsed("queues", |v| v.parse::<u32>().map_err(|e| e.to_string()));
        assert_eq!(queues, Ok(Some(4)));
    }

    #[test]
    fn sizes_are_read() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("fast").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
