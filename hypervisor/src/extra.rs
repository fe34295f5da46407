//! Extra QEMU arguments (Ganeti's `kvm_extra`). Free-form arguments break
//! the rule that a runtime's command line is exactly what its fields say,
//! so none runs unless the node's operator listed it: each option, with
//! its value, must match an entry of the node's allowance verbatim. Pure.

/// Most extra arguments a spec may carry.
pub const MAX_EXTRA_ARGS: usize = 64;
/// Longest extra argument.
pub const MAX_EXTRA_ARG: usize = 1024;

/// Why extra arguments were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtraArgsError {
    /// Not a list of options, each with its values.
    #[error(
        "extra QEMU arguments {0:?}: give options, each followed by its value (like -device virtio-rng-pci), at most {MAX_EXTRA_ARGS} arguments of {MAX_EXTRA_ARG} bytes without control characters"
    )]
    Shape(String),
    /// An option the node doesn't allow.
    #[error(
        "extra QEMU option {0:?} is not allowed on this node; its operator lists the permitted ones in allowed_extra_options"
    )]
    NotAllowed(String),
}

/// The options of `args`, each joined with its values by a space:
/// `["-device", "virtio-rng-pci"]` is `["-device virtio-rng-pci"]`.
pub fn options(args: &[String]) -> Result<Vec<String>, ExtraArgsError> {
    let shape = || ExtraArgsError::Shape(args.join(" "));
    let sound =
        |a: &String| !a.is_empty() && a.len() <= MAX_EXTRA_ARG && !a.chars().any(char::is_control);
    if args.len() > MAX_EXTRA_ARGS || !args.iter().all(sound) {
        return Err(shape());
    }
    let mut options: Vec<String> = Vec::new();
    for arg in args {
        match options.last_mut() {
            _ if arg.starts_with('-') => options.push(arg.clone()),
            Some(option) => {
                option.push(' ');
                option.push_str(arg);
            }
            None => return Err(shape()),
        }
    }
    Ok(options)
}

/// Checks `args` against the node's `allowed` options.
pub fn check_allowed(args: &[String], allowed: &[String]) -> Result<(), ExtraArgsError> {
    match options(args)?.into_iter().find(|o| !allowed.contains(o)) {
        Some(refused) => Err(ExtraArgsError::NotAllowed(refused)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn options_take_their_values_and_must_each_be_allowed() {
        let extra = args("-device virtio-rng-pci -no-hpet");
        assert_eq!(
            options(&extra).unwrap(),
            ["-device virtio-rng-pci", "-no-hpet"]
        );
        let allowed = ["-device virtio-rng-pci".to_owned(), "-no-hpet".to_owned()];
        assert_eq!(check_allowed(&extra, &allowed), Ok(()));
        assert_eq!(
            check_allowed(&extra, &allowed[..1]),
            Err(ExtraArgsError::NotAllowed("-no-hpet".into()))
        );
        // A value is part of the option: another device isn't allowed.
        assert!(check_allowed(&args("-device e1000"), &allowed).is_err());
        assert_eq!(check_allowed(&[], &[]), Ok(()));
    }

    #[test]
    fn a_value_without_an_option_or_a_control_character_is_refused() {
        assert!(matches!(
            options(&args("virtio-rng-pci")),
            Err(ExtraArgsError::Shape(_))
        ));
        assert!(matches!(
            options(&["-device".into(), "a\nb".into()]),
            Err(ExtraArgsError::Shape(_))
        ));
    }
}
