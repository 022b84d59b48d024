//! `kiln launch`: starts N ranks of a command with Open MPI's `mpirun`, prefixes every line
//! they print with its rank, and fails when any rank fails, naming it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use kiln_recipes::distributed::{MAX_RESTARTS_ENV, RESTART_ENV};
use kiln_trainer::StopSignal;

/// Flags of `kiln launch`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kiln launch --nproc-per-node 2 -- kiln train cnn-mnist --epochs 3
  kiln launch --nproc-per-node 2 --transport tcp -- kiln collectives --bench
  kiln launch --nproc-per-node 1 --hosts 10.0.0.1,10.0.0.2 --tcp-interface eth0 -- kiln train cnn-mnist

Every rank runs the same command; `kiln` as its first word means this very kiln binary.
Ranks learn their rank and world size from mpirun (OMPI_COMM_WORLD_*); `kiln train` then
trains data parallel with --batch-size as the global batch, and rank 0 alone prints results
and writes checkpoints. The ranks' binary must be built with `--features mpi`.
With --hosts, the binary must exist at the same path on every host, and mpirun must reach
every host over ssh (or the agent named by OMPI_MCA_plm_rsh_agent).")]
pub struct LaunchArgs {
    /// Ranks to start on each host.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    nproc_per_node: u32,
    /// Hosts to run on, comma-separated [default: this machine only].
    #[arg(long, value_name = "H1,H2", value_delimiter = ',')]
    hosts: Vec<String>,
    /// How ranks exchange data: auto (MPI chooses: shared memory on one host, TCP between
    /// hosts), shm (shared memory only: one host), tcp (TCP only, even on one host).
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Network interface(s) for TCP traffic, e.g. eth0 or lo [default: lo for --transport tcp
    /// on one host; MPI's choice otherwise].
    #[arg(long, value_name = "IF")]
    tcp_interface: Option<String>,
    /// The mpirun to use.
    #[arg(long, value_name = "PATH", default_value = "mpirun")]
    mpirun: PathBuf,
    /// Print the ranks' lines unchanged, without the `[rank R] ` prefix (e.g. to pipe rank 0's
    /// --json output).
    #[arg(long)]
    no_prefix: bool,
    /// Print the mpirun command line and exit.
    #[arg(long)]
    dry_run: bool,
    /// When a rank dies (killed, out of memory, a panic), stop the job and start it again
    /// from its latest checkpoint, up to N times (like torchrun's --max-restarts). The job's
    /// `kiln train` or `kiln finetune` needs --out; a restart resumes from that directory
    /// (use --checkpoint-every to lose at most that many steps) and ends with the model of an
    /// uninterrupted run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_restarts: u32,
    /// The command every rank runs, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// Transports on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// MPI's choice.
    Auto,
    /// Shared memory (Open MPI's vader BTL).
    Shm,
    /// TCP sockets.
    Tcp,
}

/// Runs `kiln launch`; the exit code is mpirun's (non-zero when any rank failed and no
/// restart was left).
pub fn run(args: &LaunchArgs) -> anyhow::Result<ExitCode> {
    let (program, mpirun_args) = mpirun_command(args)?;
    if args.dry_run {
        let words: Vec<String> = std::iter::once(program.to_string_lossy().into_owned())
            .chain(mpirun_args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect();
        println!("{}", words.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    StopSignal::install_handlers().context("cannot install the SIGTERM handler")?;
    for attempt in 0..=args.max_restarts {
        let Attempt {
            status,
            summary,
            stop,
        } = run_once(args, (&program, &mpirun_args), attempt)?;
        if let Some(signal) = stop {
            // A training job's ranks have said where their checkpoint is; other commands
            // simply ended.
            eprintln!(
                "kiln launch: stopped by {} (passed on to every rank)",
                kiln_trainer::stop::signal_name(signal)
            );
            return Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)));
        }
        if status.success() {
            if attempt > 0 {
                eprintln!("kiln launch: the job finished after {attempt} restart(s)");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let code = status.code().unwrap_or(1);
        if attempt < args.max_restarts {
            eprintln!(
                "kiln launch: the job failed (mpirun exit code {code}): {summary}; restarting it \
                 from its latest checkpoint (restart {} of {})",
                attempt + 1,
                args.max_restarts
            );
            continue;
        }
        eprintln!("kiln launch: the job failed (mpirun exit code {code}): {summary}");
        return Ok(ExitCode::from(
            u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1),
        ));
    }
    unreachable!("the last attempt returns")
}

/// One run of the job: mpirun's status, and what its lines said of failed ranks.
fn run_once(
    args: &LaunchArgs,
    (program, mpirun_args): (&PathBuf, &[OsString]),
    attempt: u32,
) -> anyhow::Result<Attempt> {
    let mut command = Command::new(program);
    // A group of its own: a Ctrl-C in the terminal reaches the launcher alone, which passes
    // the stop on (mpirun would otherwise kill the ranks before they checkpoint).
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .env(RESTART_ENV, attempt.to_string())
        .env(MAX_RESTARTS_ENV, args.max_restarts.to_string());
    command
        .args(mpirun_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if running_as_root() {
        // Open MPI refuses root unless told twice; CI and containers run as root.
        command
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    // A session directory of its own: Open MPI 4's shared one (/tmp/ompi.HOST.UID) is removed
    // by a job that ends while another one starts, which then fails with "A call to mkdir was
    // unable to create the desired directory". On several hosts the path would have to exist
    // everywhere, so they keep Open MPI's default.
    let session_dir = args
        .hosts
        .is_empty()
        .then(|| std::env::temp_dir().join(format!("kiln-launch-{}", std::process::id())));
    if let Some(dir) = &session_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        command.env("OMPI_MCA_orte_tmpdir_base", dir);
    }
    let spawned = command.spawn();
    if let (Err(_), Some(dir)) = (&spawned, &session_dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
    let mut child = spawned.with_context(|| {
        format!(
            "cannot start {}: install Open MPI (Debian: apt-get install openmpi-bin) or pass \
             --mpirun PATH",
            program.display()
        )
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let failures = Mutex::new(Vec::<String>::new());
    let prefix = !args.no_prefix;
    StopSignal::kill_group_on_second_signal(child.id() as i32);
    let (status, stop) = std::thread::scope(|scope| {
        scope.spawn(|| relay(stdout, prefix, &failures));
        scope.spawn(|| relay(stderr, prefix, &failures));
        wait_forwarding_stop(&mut child)
    })
    .context("waiting for mpirun")?;
    if let Some(dir) = &session_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    let summary = if failures.is_empty() {
        String::from("a rank failed (see mpirun's messages above)")
    } else {
        failures.join("; ")
    };
    Ok(Attempt {
        status,
        summary,
        stop,
    })
}

/// How one run of the job ended.
struct Attempt {
    status: std::process::ExitStatus,
    /// What mpirun's lines said of failed ranks.
    summary: String,
    /// The signal the launcher was stopped by, passed on to the ranks.
    stop: Option<i32>,
}

/// Waits for mpirun; a SIGTERM or Ctrl-C to the launcher reaches every rank as SIGUSR1
/// (mpirun forwards it, while its own SIGTERM would kill them a second later), and the ranks
/// stop together at one step with one checkpoint.
fn wait_forwarding_stop(
    child: &mut std::process::Child,
) -> std::io::Result<(std::process::ExitStatus, Option<i32>)> {
    let stop = StopSignal::process();
    let mut forwarded = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, forwarded));
        }
        if let (None, Some(signal)) = (forwarded, stop.requested()) {
            // SAFETY: signalling the mpirun this launcher started and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
            forwarded = Some(signal);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The mpirun program and its arguments for `args`.
fn mpirun_command(args: &LaunchArgs) -> anyhow::Result<(PathBuf, Vec<OsString>)> {
    let per_node = args.nproc_per_node as usize;
    let hosts = args.hosts.iter().filter(|h| !h.is_empty()).count();
    let total = per_node * hosts.max(1);
    let mut out: Vec<OsString> = vec![
        "-np".into(),
        total.to_string().into(),
        "--tag-output".into(),
    ];
    if args.max_restarts > 0 {
        // Every host's ranks learn the attempt.
        out.extend([
            "-x".into(),
            RESTART_ENV.into(),
            "-x".into(),
            MAX_RESTARTS_ENV.into(),
        ]);
    }
    if hosts > 0 {
        let list: Vec<String> = args
            .hosts
            .iter()
            .filter(|h| !h.is_empty())
            .map(|h| format!("{h}:{per_node}"))
            .collect();
        out.extend(["--host".into(), list.join(",").into()]);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if per_node > cores {
        // More ranks than cores on a host: Open MPI refuses unless told.
        out.push("--oversubscribe".into());
    }
    let mut mca = |key: &str, value: &str| out.extend(["--mca".into(), key.into(), value.into()]);
    match args.transport {
        Transport::Auto => {}
        Transport::Shm => {
            if hosts > 1 {
                bail!("--transport shm works on one host only; use tcp or auto with --hosts");
            }
            mca("btl", "self,vader");
        }
        Transport::Tcp => mca("btl", "self,tcp"),
    }
    let interface = match (&args.tcp_interface, args.transport, hosts > 1) {
        (Some(interface), _, _) => Some(interface.as_str()),
        (None, Transport::Tcp, false) => Some("lo"),
        _ => None,
    };
    if let Some(interface) = interface {
        mca("btl_tcp_if_include", interface);
        mca("oob_tcp_if_include", interface);
    }
    let (first, rest) = args
        .command
        .split_first()
        .context("name the command every rank runs after --")?;
    // `kiln` means this binary, so that a launch never picks up another kiln on PATH.
    let program: OsString = if first == "kiln" {
        std::env::current_exe()
            .context("cannot find this kiln executable")?
            .into()
    } else {
        first.clone()
    };
    out.push(program);
    out.extend(rest.iter().cloned());
    Ok((args.mpirun.clone(), out))
}

/// Copies mpirun's output line by line, turning `--tag-output`'s `[job,R]<stdout>:` into
/// `[rank R] `, and remembers the lines that say a rank failed.
fn relay(stream: impl std::io::Read, prefix: bool, failures: &Mutex<Vec<String>>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let (rank, to_stdout, text) = match parse_tagged(&line) {
            Some((rank, to_stdout, text)) => (Some(rank), to_stdout, strip_tags(text)),
            None => (None, false, line.clone()),
        };
        let text = text.as_str();
        if let Some(failure) = failure_of(rank, text) {
            failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(failure);
        }
        let shown = match (prefix, rank) {
            (false, _) => text.to_string(),
            (true, Some(rank)) => format!("[rank {rank}] {text}"),
            (true, None) => format!("[mpirun] {text}"),
        };
        // A closed pipe (e.g. `| head`) must not kill the launcher before mpirun is reaped.
        let _ = if to_stdout {
            writeln!(std::io::stdout(), "{shown}")
        } else {
            writeln!(std::io::stderr(), "{shown}")
        };
    }
}

/// `[1,0]<stdout>:text` -> (0, true, "text").
fn parse_tagged(line: &str) -> Option<(usize, bool, &str)> {
    let rest = line.strip_prefix('[')?;
    let (ids, rest) = rest.split_once(']')?;
    let (_job, rank) = ids.split_once(',')?;
    let rank = rank.parse().ok()?;
    let (stream, text) = rest.strip_prefix('<')?.split_once(">:")?;
    Some((rank, stream == "stdout", text))
}

/// `text` without the tags mpirun puts inside a line when a rank writes it in pieces
/// (`epoch 1/3 ...[1,0]<stderr>:`).
fn strip_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let candidate = &rest[open..];
        match parse_tagged(candidate) {
            Some((_, _, after)) => rest = after,
            None => {
                out.push('[');
                rest = &candidate[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A short description of a failed rank, from a rank's own error line or mpirun's report.
fn failure_of(rank: Option<usize>, text: &str) -> Option<String> {
    if let Some(rank) = rank {
        // Lines printed by MpiSession::run and the watchdog: "rank R: error: ...".
        let own = format!("rank {rank}: ");
        return text
            .strip_prefix(&own)
            .filter(|rest| {
                rest.starts_with("error:")
                    || rest.contains("timed out")
                    || rest.contains("panicked")
            })
            .map(|rest| format!("rank {rank}: {rest}"));
    }
    // mpirun: "mpirun noticed that process rank 1 with PID 123 on node h exited on signal 9
    // (Killed)." / "... rank 1 ... exited with status 1".
    let at = text.find("process rank ")?;
    let words: Vec<&str> = text[at..].split_whitespace().collect();
    let rank = words.get(2)?;
    let how = text
        .find("exited on signal")
        .or_else(|| text.find("exited with"))
        .map_or("failed", |i| text[i..].trim_end_matches('.'));
    Some(format!("rank {rank} {how}"))
}

/// Whether this process runs as root (Linux: the effective uid in /proc/self/status).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_lines_and_failures_are_parsed() {
        assert_eq!(
            parse_tagged("[1,3]<stderr>:epoch 1/3"),
            Some((3, false, "epoch 1/3"))
        );
        assert_eq!(
            parse_tagged("[1,0]<stdout>:{\"a\":1}"),
            Some((0, true, "{\"a\":1}"))
        );
        assert_eq!(parse_tagged("plain mpirun text"), None);
        assert_eq!(
            strip_tags("epoch 1/3 [ok] done[1,0]<stderr>:"),
            "epoch 1/3 [ok] done"
        );
        assert_eq!(
            failure_of(
                None,
                "mpirun noticed that process rank 1 with PID 42 on node x exited on signal 9 (Killed)."
            ),
            Some("rank 1 exited on signal 9 (Killed)".into())
        );
        assert_eq!(
            failure_of(Some(1), "rank 1: error: training failed"),
            Some("rank 1: error: training failed".into())
        );
        assert_eq!(failure_of(Some(0), "epoch 1/3 done"), None);
    }
}
