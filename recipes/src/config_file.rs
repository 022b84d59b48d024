//! Configuration files: every flag of `kiln train`, `kiln finetune` and `kiln quantize` as a
//! TOML key (the flag's name without `--`), read with `--config FILE`, printed with
//! `--print-config`, and written into each run directory as `config.toml`.
//!
//! The file is read through clap itself: each key is checked against the command's flags and
//! its value against the flag's own parser (naming the file and line of a bad one), then
//! becomes that flag on the command line unless the user gave the flag there too. So a file
//! can express exactly what flags can, flags override it, and the rules between flags
//! (`--micro-batches` needs `--pipeline-stages`, ...) apply to keys alike.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command};
use kiln_trainer::{LrSchedule, OptimizerConfig, TrainerConfig};
use toml::de::{DeTable, DeValue};

use crate::error::{RecipeError, Result};

/// File name of the resolved configuration in a run directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Keys that say where a run goes or how it prints, not what it computes: not part of a run's
/// `config.toml`, so that `--config RUN/config.toml` starts a new run instead of resuming.
const LOCATION_KEYS: [&str; 4] = ["out", "resume", "json", "quiet"];

/// Flags that are about the command line itself, never part of a resolved configuration.
const NOT_SETTINGS: [&str; 4] = ["config", "print-config", "help", "version"];

/// The `--config` and `--print-config` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// Read flags from a TOML file: each key is a flag's name without `--` (`batch-size =
    /// 128`, `nesterov = true`, `lr-schedule = "cosine"`). Flags given on the command line
    /// override the file. A run's resolved RUN/config.toml reproduces it.
    #[arg(long, value_name = "FILE", help_heading = "Configuration")]
    pub config: Option<PathBuf>,
    /// Print the resolved configuration (file, flags and the recipe's defaults) as TOML and
    /// exit without training.
    #[arg(long, help_heading = "Configuration")]
    pub print_config: bool,
}

/// `argv` with the keys of its subcommand's `--config FILE` added as flags, for the flags the
/// command line does not give. Without `--config`, or when `argv` does not parse (clap then
/// reports it), `argv` unchanged.
///
/// # Errors
/// [`RecipeError::ConfigFile`] naming the file, and the line of a bad key: unreadable,
/// not TOML, an unknown key, or a value of the wrong type or out of range.
pub fn expand_args(command: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    Ok(expand(command, argv)?.0)
}

/// [`expand_args`], and the flags the file added (for an error that involves them).
///
/// # Errors
/// As [`expand_args`].
pub fn expand(command: &Command, argv: Vec<OsString>) -> Result<(Vec<OsString>, Vec<String>)> {
    let Ok(matches) = command.clone().try_get_matches_from(&argv) else {
        return Ok((argv, Vec::new()));
    };
    let (leaf, leaf_matches) = leaf(command, &matches);
    let Some(path) = config_path(leaf_matches) else {
        return Ok((argv, Vec::new()));
    };
    let text = std::fs::read_to_string(&path).map_err(|e| RecipeError::ConfigFile {
        path: path.clone(),
        reason: format!("cannot read it: {e}"),
    })?;
    let table = DeTable::parse(&text).map_err(|e| RecipeError::ConfigFile {
        path: path.clone(),
        reason: e.to_string().trim_end().to_string(),
    })?;
    let mut added = Vec::new();
    for (key, value) in table.get_ref() {
        let bad = |reason: String| RecipeError::ConfigFile {
            path: path.clone(),
            reason: format!("line {}: {reason}", line_of(&text, key.span().start)),
        };
        let key = key.get_ref().as_ref();
        let arg = find_arg(leaf, key).map_err(bad)?;
        if leaf_matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        added.extend(flag_args(arg, key, value.get_ref()).map_err(bad)?);
    }
    let mut args = argv;
    args.extend(added.iter().map(OsString::from));
    Ok((args, added))
}

/// The innermost subcommand of `matches`, and its matches.
fn leaf<'a>(command: &'a Command, matches: &'a ArgMatches) -> (&'a Command, &'a ArgMatches) {
    let (mut command, mut matches) = (command, matches);
    while let Some((name, sub)) = matches.subcommand() {
        match command.find_subcommand(name) {
            Some(found) => (command, matches) = (found, sub),
            None => break,
        }
    }
    (command, matches)
}

fn config_path(matches: &ArgMatches) -> Option<PathBuf> {
    matches
        .try_get_one::<PathBuf>("config")
        .ok()
        .flatten()
        .cloned()
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The flag a key names.
fn find_arg<'a>(command: &'a Command, key: &str) -> std::result::Result<&'a Arg, String> {
    if key == "config" || key == "print-config" {
        return Err(format!("`{key}` cannot be set inside a configuration file"));
    }
    if let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(key)) {
        return Ok(arg);
    }
    let kebab = key.replace('_', "-");
    let hint = if command
        .get_arguments()
        .any(|a| a.get_long() == Some(kebab.as_str()))
    {
        format!(" (did you mean `{kebab}`?)")
    } else {
        String::new()
    };
    Err(format!(
        "unknown key `{key}`: `{}` has no --{key} flag{hint}; the keys are the flags of \
         `--help` without their dashes",
        command.get_name()
    ))
}

fn is_switch(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

/// Whether the flag may be given without a value (`--resume`).
fn value_optional(arg: &Arg) -> bool {
    arg.get_num_args().is_some_and(|n| n.min_values() == 0)
}

/// The command-line words for `key = value`, checked by the flag's own parser.
fn flag_args(
    arg: &Arg,
    key: &str,
    value: &DeValue<'_>,
) -> std::result::Result<Vec<String>, String> {
    let text = match value {
        DeValue::Boolean(on) if is_switch(arg) || value_optional(arg) => {
            return Ok(if *on {
                vec![format!("--{key}")]
            } else {
                Vec::new()
            });
        }
        DeValue::Boolean(_) => return Err(format!("`{key}` takes a value, not true or false")),
        _ if is_switch(arg) => return Err(format!("`{key}` is a switch: write true or false")),
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Datetime(_) | DeValue::Array(_) | DeValue::Table(_) => {
            return Err(format!("`{key}` takes one number, word or path"));
        }
    };
    // The flag alone, with its parser (clap keeps `parse_ref` to itself).
    let flag = Arg::new("value")
        .long("value")
        .action(ArgAction::Set)
        .value_parser(arg.get_value_parser().clone());
    Command::new("config")
        .no_binary_name(true)
        .arg(flag)
        .try_get_matches_from([format!("--value={text}")])
        .map_err(|e| {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            let first = first.trim_start_matches("error: ");
            let choices = message
                .lines()
                .find(|l| l.contains("possible values"))
                .map(|l| format!(" {}", l.trim()));
            format!(
                "`{key}`: {}{}",
                first.replace("'--value <value>'", &format!("--{key}")),
                choices.unwrap_or_default()
            )
        })?;
    Ok(vec![format!("--{key}={text}")])
}

/// The resolved configuration of a parsed command: the flags given (on the command line or
/// by a file) and the recipe's trainer settings as keys, the flags left at their defaults as
/// comments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResolvedConfig {
    /// `kiln train cnn-mnist`, for the header.
    pub command: String,
    /// Keys set by the user.
    pub given: toml::Table,
    /// Flags at their defaults, shown as comments.
    pub defaults: toml::Table,
    /// Every key the command has.
    pub keys: Vec<String>,
}

impl ResolvedConfig {
    /// The configuration of `matches` (of `command`, whose subcommands it follows).
    pub fn of(command: &Command, matches: &ArgMatches) -> Self {
        let mut names = vec![command.get_name().to_string()];
        let (mut cmd, mut m) = (command, matches);
        while let Some((name, sub)) = m.subcommand() {
            let Some(found) = cmd.find_subcommand(name) else {
                break;
            };
            names.push(name.to_string());
            (cmd, m) = (found, sub);
        }
        let mut resolved = ResolvedConfig {
            command: names.join(" "),
            ..Self::default()
        };
        for arg in cmd.get_arguments() {
            let (Some(key), id) = (arg.get_long(), arg.get_id().as_str()) else {
                continue;
            };
            if NOT_SETTINGS.contains(&key) {
                continue;
            }
            resolved.keys.push(key.to_string());
            let Some(value) = toml_value(arg, m, id) else {
                continue;
            };
            let into = match m.value_source(id) {
                Some(ValueSource::DefaultValue) => &mut resolved.defaults,
                _ => &mut resolved.given,
            };
            into.insert(key.to_string(), value);
        }
        resolved
    }

    /// With the trainer settings a run resolved (epochs, batch size, optimizer, schedule, ...)
    /// as keys, where the command has the flag.
    pub fn with_trainer(mut self, config: &TrainerConfig) -> Self {
        for (key, value) in trainer_keys(config) {
            if self.keys.iter().any(|k| k == key) {
                self.defaults.remove(key);
                self.given.insert(key.to_string(), value);
            }
        }
        self
    }

    /// The TOML text: a header, the keys, and the defaults as comments; with `for_run_dir`,
    /// without the keys naming where the run goes.
    pub fn to_toml(&self, for_run_dir: bool) -> String {
        let keep = |key: &str| !(for_run_dir && LOCATION_KEYS.contains(&key));
        let mut given = self.given.clone();
        given.retain(|k, _| keep(k));
        let mut text = format!(
            "# {}: resolved configuration (kiln {}).\n# Each key is a flag without its \
             dashes; `{} --config FILE` reads it back.\n\n",
            self.command,
            env!("CARGO_PKG_VERSION"),
            self.command
        );
        text.push_str(&toml::to_string(&given).unwrap_or_default());
        let defaults: Vec<_> = self
            .defaults
            .iter()
            .filter(|(k, _)| keep(k.as_str()))
            .collect();
        if !defaults.is_empty() {
            text.push_str("\n# Flags at their defaults:\n");
            for (key, value) in defaults {
                text.push_str(&format!("# {key} = {value}\n"));
            }
        }
        text
    }

    /// With the keys of the `config.toml` already in `run_dir` (a resumed run's) that this
    /// command does not set: a resume given only `--epochs` keeps the run's other settings.
    ///
    /// # Errors
    /// [`RecipeError::ConfigFile`] when that file exists but is not TOML.
    pub fn over_existing(mut self, run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(CONFIG_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(self);
        };
        let existing: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| RecipeError::ConfigFile {
                    path: path.clone(),
                    reason: e.to_string().trim_end().to_string(),
                })?;
        for (key, value) in existing {
            if !self.given.contains_key(&key) && self.keys.contains(&key) {
                self.defaults.remove(&key);
                self.given.insert(key, value);
            }
        }
        Ok(self)
    }

    /// Writes `config.toml` into `run_dir`, atomically.
    ///
    /// # Errors
    /// [`RecipeError::Train`] with an I/O error when the file cannot be written.
    pub fn write(&self, run_dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(run_dir).map_err(|e| {
            RecipeError::Train(kiln_trainer::TrainError::Io {
                action: "create directory",
                path: run_dir.to_path_buf(),
                source: e,
            })
        })?;
        let path = run_dir.join(CONFIG_FILE);
        kiln_trainer::checkpoint::write_atomic(&path, self.to_toml(true).as_bytes())?;
        Ok(path)
    }
}

/// The value of flag `id` in `matches` as TOML: switches as booleans, numbers as numbers, a
/// flag given without its optional value as `true`; `None` when unset.
fn toml_value(arg: &Arg, matches: &ArgMatches, id: &str) -> Option<toml::Value> {
    let raw: Vec<String> = matches
        .get_raw(id)?
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if is_switch(arg) {
        return Some(toml::Value::Boolean(
            raw.first().is_some_and(|v| v == "true"),
        ));
    }
    let Some(text) = raw.first() else {
        return value_optional(arg).then_some(toml::Value::Boolean(true));
    };
    Some(if let Ok(i) = text.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let (Ok(f), true) = (text.parse::<f64>(), text.contains(['.', 'e', 'E'])) {
        toml::Value::Float(f)
    } else {
        toml::Value::String(text.clone())
    })
}

/// The flags that reproduce a trainer configuration's hyper-parameters.
fn trainer_keys(config: &TrainerConfig) -> Vec<(&'static str, toml::Value)> {
    use toml::Value::{Boolean, Float, Integer, String as Text};
    let int = |n: u64| Integer(i64::try_from(n).unwrap_or(i64::MAX));
    // The shortest decimal that reads back as the same f32 (0.01, not 0.009999999776...).
    let f32_value = |x: f32| Float(x.to_string().parse().unwrap_or(f64::from(x)));
    let mut keys = vec![
        ("epochs", int(config.epochs as u64)),
        ("batch-size", int(config.batch_size as u64)),
        ("lr", Float(config.lr)),
        ("seed", int(config.seed)),
        (
            "accumulation-steps",
            int(config.accumulation_steps.get() as u64),
        ),
    ];
    if let Some(norm) = config.clip_grad_norm {
        keys.push(("clip-grad-norm", Float(norm)));
    }
    if let Some(every) = config.checkpoint_every {
        keys.push(("checkpoint-every", int(every.get())));
    }
    let keep_last = config.retention.keep_last.map_or(0, |n| n.get() as u64);
    keys.push(("keep-last", int(keep_last)));
    keys.push(("keep-best", Text(config.retention.keep_best.to_string())));
    keys.push(("sync-checkpoints", Boolean(config.sync_checkpoints)));
    match config.optimizer {
        OptimizerConfig::Sgd {
            momentum,
            nesterov,
            weight_decay,
            ..
        } => keys.extend([
            ("optimizer", Text("sgd".into())),
            ("momentum", Float(momentum)),
            ("nesterov", Boolean(nesterov)),
            ("weight-decay", f32_value(weight_decay)),
        ]),
        OptimizerConfig::Adam { weight_decay, .. } => keys.extend([
            ("optimizer", Text("adam".into())),
            ("weight-decay", f32_value(weight_decay)),
        ]),
        OptimizerConfig::AdamW { weight_decay, .. } => keys.extend([
            ("optimizer", Text("adamw".into())),
            ("weight-decay", f32_value(weight_decay)),
        ]),
    }
    match config.schedule {
        LrSchedule::Constant => keys.push(("lr-schedule", Text("constant".into()))),
        LrSchedule::Step { every, gamma } => keys.extend([
            ("lr-schedule", Text("step".into())),
            ("lr-step-every", int(every)),
            ("lr-gamma", Float(gamma)),
        ]),
        LrSchedule::WarmupCosine {
            warmup_steps,
            min_lr,
            ..
        } => keys.extend([
            ("lr-schedule", Text("cosine".into())),
            ("warmup-steps", int(warmup_steps)),
            ("min-lr", Float(min_lr)),
        ]),
    }
    keys
}

/// Writes a run's `config.toml`: `resolved` with the trainer settings of the run, over the
/// file a resumed run already has.
///
/// # Errors
/// I/O errors writing it; [`RecipeError::ConfigFile`] when a resumed run's file is not TOML.
pub(crate) fn write_run_config(
    resolved: &ResolvedConfig,
    trainer: &TrainerConfig,
    run_dir: &Path,
    resumed: bool,
) -> Result<PathBuf> {
    let mut resolved = resolved.clone().with_trainer(trainer);
    if resumed {
        resolved = resolved.over_existing(run_dir)?;
    }
    resolved.write(run_dir)
}
