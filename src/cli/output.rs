//! Results on stdout: a human sentence, or with `--json` one JSON object as the last line.

use serde::Serialize;

/// Prints `report` as JSON when `json` is set, else the sentence `human` makes.
pub fn print<T: Serialize>(
    json: bool,
    report: &T,
    human: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", human());
    }
    Ok(())
}
