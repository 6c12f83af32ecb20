//! The examples' command lines: `--flag value` pairs and bare switches, with the usage text in
//! every error.

use std::fmt::Display;
use std::str::FromStr;

/// Calls `set(flag, value)` for each `--flag value` pair and `set(flag, "")` for each switch in
/// `switches`; `-h`/`--help` answers with the usage.
pub fn parse(
    usage: &str,
    switches: &[&str],
    mut set: impl FnMut(&str, &str) -> Result<(), String>,
) -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(usage.to_string());
        }
        let value = if switches.contains(&flag.as_str()) {
            String::new()
        } else {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{usage}"))?
        };
        set(&flag, &value).map_err(|e| format!("{e}\n{usage}"))?;
    }
    Ok(())
}

/// `value` read as a `T`, or an error that names the flag.
pub fn value<T: FromStr>(flag: &str, value: &str) -> Result<T, String>
where
    T::Err: Display,
{
    value.parse().map_err(|e| format!("{flag} {value}: {e}"))
}
