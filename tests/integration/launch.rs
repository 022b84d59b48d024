//! `kiln launch` and multi-process training over MPI.
//!
//! Without the `mpi` feature only the launcher's command line and the refusals are tested;
//! with it (`cargo test --features mpi`, as CI runs), real jobs of 2 and 3 processes: every
//! collective against closed-form values, training equal to the in-process ranks, and a
//! killed, stalled or failing rank stopping the whole job with a non-zero exit.

use std::process::Command;

use crate::common::{assert_clean_failure, kiln, kiln_ok};

#[test]
fn dry_run_shows_the_mpirun_command() {
    let out = kiln_ok(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--transport",
        "tcp",
        "--dry-run",
        "--",
        "kiln",
        "train",
        "cnn-mnist",
    ]);
    let line = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "mpirun -np 3 --tag-output",
        "--mca btl self,tcp",
        "--mca btl_tcp_if_include lo",
        env!("CARGO_BIN_EXE_kiln"),
        " train cnn-mnist",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(line.contains("--oversubscribe"), cores < 3, "{line}");

    let out = kiln_ok(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--hosts",
        "h1,h2",
        "--dry-run",
        "--",
        "./train.sh",
    ]);
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains("-np 4") && line.contains("--host h1:2,h2:2"),
        "{line}"
    );
}

#[test]
fn bad_launches_are_clear_errors() {
    assert_clean_failure(
        &kiln(&[
            "launch",
            "--hosts",
            "a,b",
            "--transport",
            "shm",
            "--",
            "kiln",
        ]),
        &["--transport shm works on one host only"],
    );
    assert_clean_failure(
        &kiln(&[
            "launch",
            "--mpirun",
            "/nonexistent/mpirun",
            "--",
            "kiln",
            "collectives",
        ]),
        &["cannot start /nonexistent/mpirun", "openmpi-bin"],
    );
    let out = kiln(&["launch", "--nproc-per-node", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("COMMAND"));
}

#[test]
fn torchrun_variables_without_an_mpi_launcher_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            "cnn-mnist",
            "--limit",
            "64",
            "--epochs",
            "1",
            "--out",
        ])
        .arg(dir.path())
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let expected = if cfg!(feature = "mpi") {
        "without an MPI launcher"
    } else {
        "built without MPI support"
    };
    assert_clean_failure(&out, &["rank 1 of 2", expected]);
    assert!(
        !dir.path().join("checkpoints").exists(),
        "a refused rank trained"
    );
}

#[cfg(feature = "mpi")]
mod mpi {
    use std::path::Path;
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use crate::common::{kiln, kiln_ok, last_json, small_text, tiny_gpt_args, train_cnn_mnist};

    /// `kiln launch` of a cnn-mnist training on 2 processes, to which flags are added.
    const TRAIN_ON_2_PROCESSES: [&str; 7] = [
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "kiln",
        "train",
        "cnn-mnist",
    ];

    /// `kiln launch --no-prefix ARGS`, which must succeed; returns rank 0's last JSON line.
    /// Other ranks' lines may come after it (mpirun merges the ranks' stdout unordered: a
    /// rank's closing "training ended." once did), so the last line that is an object counts.
    fn launch_json(args: &[&str]) -> serde_json::Value {
        let out = kiln_ok(&[&["launch", "--no-prefix"], args].concat());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON line in {stdout}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    #[test]
    fn every_collective_matches_closed_form_values_across_processes() {
        for (procs, transport) in [("2", "shm"), ("2", "tcp"), ("3", "auto")] {
            let report = launch_json(&[
                "--nproc-per-node",
                procs,
                "--transport",
                transport,
                "--",
                "kiln",
                "collectives",
                "--json",
            ]);
            assert_eq!(report["engine"], "mpi", "{report}");
            assert_eq!(
                report["world_size"],
                procs.parse::<u64>().unwrap(),
                "{report}"
            );
            // 6 lengths x 8 checked calls + the final barrier.
            assert_eq!(report["verified_calls"], 49, "{report}");
        }
    }

    /// `kiln launch --nproc-per-node 2 -- target/release/examples/NAME`, which must succeed;
    /// returns its stdout.
    fn launch_example(name: &str) -> String {
        let example = Path::new(env!("CARGO_BIN_EXE_kiln"))
            .parent()
            .unwrap()
            .join("examples")
            .join(name);
        assert!(
            example.exists(),
            "{} is missing: build it first with `cargo build --release --features mpi \
             --example {name}` (CI does)",
            example.display()
        );
        let out = kiln_ok(&[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            example.to_str().unwrap(),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn misused_collectives_fail_on_every_rank_and_the_job_goes_on() {
        let stdout = launch_example("mpi_errors");
        for rank in 0..2 {
            for needle in [
                format!("[rank {rank}] rank {rank}: all_gather failed"),
                format!("[rank {rank}] rank {rank}: all_reduce failed"),
                format!("[rank {rank}] rank {rank}: still in step"),
            ] {
                assert!(stdout.contains(&needle), "{needle:?} missing: {stdout}");
            }
        }
        assert!(
            stdout.contains("buffer has 3 elements, expected 4"),
            "{stdout}"
        );
        assert!(
            stdout.contains("another rank passed a buffer of the wrong length"),
            "{stdout}"
        );
        assert!(stdout.contains("ranks disagree"), "{stdout}");
    }

    #[test]
    fn tensor_parallel_layers_train_like_one_device_across_processes() {
        // The example checks its logits against one device itself and fails otherwise.
        let stdout = launch_example("tensor_parallel");
        assert!(
            stdout.contains("[rank 0] tensor parallel on 2 ranks")
                && stdout.contains("max |logit difference| vs one device"),
            "{stdout}"
        );
    }

    #[test]
    fn launched_training_equals_in_process_ranks() {
        // Plain data parallelism, and with the optimizer state and gradients sharded (ZeRO-2)
        // over MPI.
        for extra in [&[][..], &["--zero", "2"][..]] {
            let dir = tempfile::tempdir().unwrap();
            let (a, b) = (dir.path().join("threads"), dir.path().join("processes"));
            let threads = train_cnn_mnist("512", &a, "2", &[&["--ranks", "2"][..], extra].concat());
            let out = b.to_str().unwrap();
            let flags = [
                "--limit", "512", "--epochs", "2", "--out", out, "--json", "-q",
            ];
            let processes = launch_json(&[&TRAIN_ON_2_PROCESSES[1..], &flags, extra].concat());
            assert_eq!(processes["ranks"], 2);
            assert_eq!(processes["sharding"], threads["sharding"]);
            for (t, p) in threads["history"]
                .as_array()
                .unwrap()
                .iter()
                .zip(processes["history"].as_array().unwrap())
            {
                for key in ["train_loss", "test_loss", "test_accuracy"] {
                    let (x, y) = (t[key].as_f64().unwrap(), p[key].as_f64().unwrap());
                    assert!(
                        (x - y).abs() <= 1e-6,
                        "{extra:?} {key}: threads {x}, processes {y}"
                    );
                }
            }
            // Rank 0 alone wrote the checkpoints.
            assert!(b.join("checkpoints/epoch-0002.ckpt").exists());
        }
    }

    /// `KILN_DDP_OVERLAP=1` under `kiln launch`: the all-reduce runs on a communication
    /// thread during backward (MPI from a second thread), and the 2 processes train the bits
    /// of the all-reduce after backward.
    #[test]
    fn an_overlapped_all_reduce_across_processes_trains_the_same_bits() {
        let dir = tempfile::tempdir().unwrap();
        let run = |name: &str, overlap: &str| {
            let out = dir.path().join(name);
            let flags = ["--limit", "512", "--epochs", "2", "--json", "-q", "--out"];
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["launch", "--no-prefix"])
                .args(&TRAIN_ON_2_PROCESSES[1..])
                .args(flags)
                .arg(&out)
                .env("KILN_DDP_OVERLAP", overlap)
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let line = stdout
                .lines()
                .rfind(|l| l.starts_with('{'))
                .unwrap()
                .to_string();
            let mode = std::fs::read_to_string(out.join("run.json")).unwrap();
            (
                serde_json::from_str::<serde_json::Value>(&line).unwrap(),
                mode,
            )
        };
        let (overlapped, mode) = run("overlapped", "1");
        assert!(
            mode.contains("all-reduce overlapped with backward"),
            "{mode}"
        );
        let (after, _) = run("after", "0");
        for epoch in 0..2 {
            for key in ["train_loss", "test_loss", "test_accuracy"] {
                let (x, y) = (
                    &overlapped["history"][epoch][key],
                    &after["history"][epoch][key],
                );
                assert!(
                    x.is_number() && x == y,
                    "epoch {}, {key}: {x} vs {y}",
                    epoch + 1
                );
            }
        }
    }

    /// `kiln train gpt`'s report for a tiny model of 2 blocks on the shipped text's first
    /// 20 kB, 20 steps, with `extra` flags; with `processes`, under `kiln launch`.
    fn train_gpt(
        dir: &std::path::Path,
        name: &str,
        processes: Option<&str>,
        extra: &[&str],
    ) -> serde_json::Value {
        let extra = [&["--limit", "320"], extra].concat();
        let args = tiny_gpt_args(&small_text(dir), &dir.join(name), "2", "1", &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match processes {
            Some(n) => launch_json(&[&["--nproc-per-node", n, "--", "kiln"][..], &args].concat()),
            None => last_json(&kiln_ok(&args)),
        }
    }

    #[test]
    fn gpt_tensor_parallel_and_data_parallel_pipelines_run_across_processes() {
        // Two processes as one tensor-parallel group (alone, or each rank a 2-stage pipeline),
        // and as two data-parallel ranks with a 2-stage pipeline each (and ZeRO-1): the same
        // run as the threads' and one device's.
        let dir = tempfile::tempdir().unwrap();
        let loss = |report: serde_json::Value| report["val_loss"].as_f64().unwrap();
        let one = loss(train_gpt(dir.path(), "one", None, &[]));
        let two = Some("2");
        let cases: [(&str, Option<&str>, &[&str]); 5] = [
            ("tp-threads", None, &["--tensor-parallel", "2"]),
            ("tp-processes", two, &["--tensor-parallel", "2"]),
            (
                "dp-pp-threads",
                None,
                &["--ranks", "2", "--pipeline-stages", "2"],
            ),
            (
                "dp-pp-processes",
                two,
                &["--pipeline-stages", "2", "--zero", "1"],
            ),
            // One tensor-parallel group of 2 processes, each a pipeline of 2 stages whose
            // groups are duplicated communicators.
            ("tp-pp-processes", two, &["--mesh", "tp=2,pp=2"]),
        ];
        for (name, processes, extra) in cases {
            let loss = loss(train_gpt(dir.path(), name, processes, extra));
            eprintln!("{name}: validation loss {loss} vs one device {one}");
            assert!(
                (loss - one).abs() < 1e-5,
                "{name}: {loss} vs one device {one}"
            );
        }
        // A group of 2 processes cannot hold 4 tensor-parallel ranks.
        let out = dir.path().join("bad");
        let bad = kiln(&[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "kiln",
            "train",
            "gpt",
            "--tensor-parallel",
            "4",
            "--heads",
            "4",
            "--out",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success(), "{stderr}");
        assert!(stderr.contains("do not split into groups of 4"), "{stderr}");
        // Four processes as a mesh: 2 replicas of 2 tensor-parallel ranks (groups split from
        // the job's communicator), alone, with each part's optimizer state sharded over its
        // replicas, and with each rank a pipeline of 2 stages.
        for (name, mesh, zero) in [
            ("dp-tp", "dp=2,tp=2", None),
            ("dp-tp-zero", "dp=2,tp=2", Some("2")),
            ("dp-tp-pp", "dp=2,tp=2,pp=2", None),
        ] {
            let mut flags = vec!["--mesh", mesh];
            flags.extend(zero.iter().flat_map(|stage| ["--zero", stage]));
            let report = train_gpt(dir.path(), name, Some("4"), &flags);
            let loss = report["val_loss"].as_f64().unwrap();
            eprintln!("{flags:?} over 4 processes: validation loss {loss} vs one device {one}");
            assert!((loss - one).abs() < 1e-5, "{flags:?}: {loss} vs {one}");
            assert_eq!(report["ranks"], 2);
            assert_eq!(
                report["zero_stage"].as_u64(),
                zero.map(|z| z.parse().unwrap())
            );
        }
    }

    #[test]
    fn a_killed_rank_restarts_the_job_from_its_checkpoint_to_the_same_model() {
        // kill -9 of rank 1 once the first mid-epoch checkpoint exists; --max-restarts 1
        // resumes from it; the run ends as an uninterrupted one does, bit for bit.
        let dir = tempfile::tempdir().unwrap();
        let (whole, restarted) = (dir.path().join("whole"), dir.path().join("restarted"));
        let flags = ["--limit", "2048", "--epochs", "3", "-q"];
        let out = whole.to_str().unwrap();
        kiln_ok(&[&TRAIN_ON_2_PROCESSES[..], &flags, &["--out", out]].concat());
        let out = restarted.to_str().unwrap();
        let marker = format!("{}-{out}", std::process::id());
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_TEST_JOB", &marker)
            .args([
                "launch",
                "--nproc-per-node",
                "2",
                "--max-restarts",
                "1",
                "--",
            ])
            .args([
                "kiln",
                "train",
                "cnn-mnist",
                "--checkpoint-every",
                "10",
                "--out",
                out,
            ])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let checkpoints = restarted.join("checkpoints");
        let has_step_checkpoint = || {
            std::fs::read_dir(&checkpoints).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains("-step-"))
            })
        };
        while !has_step_checkpoint() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = *pids_of_rank(&marker, 1).first().expect("rank 1 runs");
        let killed = Instant::now();
        // SAFETY: signalling a process of the job this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = Command::new("pkill").args(["-9", "-f", &marker]).status();
                panic!("the restarted job did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        for needle in [
            "rank 1 exited on signal 9",
            "restarting it from its latest checkpoint (restart 1 of 1)",
            "the job finished after 1 restart(s)",
        ] {
            assert!(stderr.contains(needle), "{needle:?} missing: {stderr}");
        }
        eprintln!(
            "killed rank 1: restarted and finished in {:?}",
            killed.elapsed()
        );
        let metrics = |run: &Path| std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let results = |text: String| -> Vec<(f64, f64, f64)> {
            text.lines()
                .map(|l| {
                    let m: serde_json::Value = serde_json::from_str(l).unwrap();
                    let f = |k: &str| m[k].as_f64().unwrap();
                    (f("train_loss"), f("test_loss"), f("test_accuracy"))
                })
                .collect()
        };
        assert_eq!(results(metrics(&restarted)), results(metrics(&whole)));
        // The parameters (a record's bytes also hold the processes' random parameter ids).
        let params = |run: &Path| {
            let path = run.join("checkpoints/epoch-0003.ckpt");
            let checkpoint = kiln::trainer::checkpoint::read_checkpoint(&path).unwrap();
            let device = burn::tensor::Device::flex();
            let model = kiln::models::SimpleCnnConfig::new().init(&device, 0);
            let model = checkpoint.load_model(model, &path).unwrap();
            kiln::multi::data_parallel::flatten_params(&model).unwrap()
        };
        assert!(
            params(&restarted) == params(&whole),
            "the final models differ"
        );
    }

    #[test]
    fn sigterm_to_the_launcher_stops_every_rank_at_one_checkpoint() {
        // SIGTERM to `kiln launch` reaches both ranks (as SIGUSR1 through mpirun); they stop
        // after the same step with one checkpoint, the launcher exits 143, and the run resumed
        // (to 6 epochs) equals an uninterrupted 6-epoch run.
        let dir = tempfile::tempdir().unwrap();
        let (whole, stopped) = (dir.path().join("whole"), dir.path().join("stopped"));
        let flags = ["--limit", "2048", "-q"];
        let out = whole.to_str().unwrap();
        kiln_ok(
            &[
                &TRAIN_ON_2_PROCESSES[..],
                &flags,
                &["--epochs", "6", "--out", out],
            ]
            .concat(),
        );
        let out = stopped.to_str().unwrap();
        let launcher = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(TRAIN_ON_2_PROCESSES)
            .args(flags)
            .args(["--epochs", "40", "--out", out])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stopped.join("checkpoints/epoch-0002.ckpt").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signalling the launcher this test started.
        unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
        let output = launcher.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(143), "{stderr}");
        assert!(
            stderr.contains("kiln launch: stopped by SIGTERM"),
            "{stderr}"
        );
        // Counted as occurrences, not lines: mpirun may interleave the ranks' messages on
        // one line.
        let needle = "stopped by SIGTERM after step ";
        let stops: Vec<&str> = stderr
            .match_indices(needle)
            .map(|(at, _)| {
                let rest = &stderr[at + needle.len()..];
                &rest[..rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len())]
            })
            .collect();
        assert_eq!(stops.len(), 2, "both ranks stop: {stderr}");
        assert_eq!(stops[0], stops[1], "at the same step: {stderr}");
        let resume = [
            &TRAIN_ON_2_PROCESSES[..],
            &flags,
            &["--epochs", "6", "--out", out],
        ];
        kiln_ok(&[&resume.concat()[..], &["--resume"]].concat());
        let results = |run: &Path| -> Vec<(f64, f64)> {
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let m: serde_json::Value = serde_json::from_str(l).unwrap();
                    (
                        m["train_loss"].as_f64().unwrap(),
                        m["test_loss"].as_f64().unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(results(&stopped), results(&whole));
    }

    /// `kiln launch --max-restarts` needs the job's --out (where a restart finds it).
    #[test]
    fn restarts_need_the_jobs_out_directory() {
        let output = crate::common::kiln(&[
            "launch",
            "--nproc-per-node",
            "1",
            "--max-restarts",
            "1",
            "--",
            "kiln",
            "train",
            "cnn-mnist",
            "--epochs",
            "1",
        ]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("give the job --out DIR"), "{stderr}");
    }

    /// The own-model example's binary (`target/release/own-model`), built with `mpi`.
    fn own_model() -> String {
        let binary = Path::new(env!("CARGO_BIN_EXE_kiln"))
            .parent()
            .unwrap()
            .join("own-model");
        assert!(
            binary.exists(),
            "{} is missing: build it first with `CARGO_TARGET_DIR=target cargo build \
             --release --features mpi --manifest-path examples/own-model/Cargo.toml` (CI does)",
            binary.display()
        );
        binary.to_str().unwrap().to_string()
    }

    #[test]
    fn a_users_own_model_on_two_processes_equals_one_device() {
        // AdamW, warm-up + cosine, clipping and accumulation 2 (the example's settings), plain
        // and with ZeRO-1 and ZeRO-2 over MPI; then burn-train's Learner with kiln's strategy
        // on 2 processes against 2 threads.
        let binary = own_model();
        let dir = tempfile::tempdir().unwrap();
        let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let run = |args: &[&str]| {
            let output = std::process::Command::new(&binary)
                .args(args)
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            last_json(&output)
        };
        let single = run(&["--epochs", "1", "--out", &out("single")]);
        for zero in [&[][..], &["--zero", "1"][..], &["--zero", "2"][..]] {
            let run_dir = out(&format!("processes{}", zero.concat()));
            let flags = [&["--epochs", "1", "--out", &run_dir][..], zero].concat();
            let launched =
                launch_json(&[&["--nproc-per-node", "2", "--", &binary][..], &flags].concat());
            assert_eq!(launched["steps"], single["steps"]);
            for key in ["train_loss", "test_loss", "test_mae"] {
                let (x, y) = (
                    single[key].as_f64().unwrap(),
                    launched[key].as_f64().unwrap(),
                );
                assert!(
                    (x - y).abs() <= 1e-5,
                    "{zero:?} {key}: one device {x}, processes {y}"
                );
            }
        }
        let threads = run(&[
            "--learner",
            "--ranks",
            "2",
            "--epochs",
            "1",
            "--out",
            &out("lt"),
        ]);
        let run_dir = out("learner-processes");
        let flags = ["--learner", "--epochs", "1", "--out", &run_dir];
        let launched =
            launch_json(&[&["--nproc-per-node", "2", "--", &binary][..], &flags].concat());
        let (x, y) = (
            threads["test_loss"].as_f64().unwrap(),
            launched["test_loss"].as_f64().unwrap(),
        );
        assert!((x - y).abs() <= 1e-5, "learner: threads {x}, processes {y}");
    }

    /// A launched training job marked with a unique environment variable, so that its rank
    /// processes can be found in /proc.
    struct Job {
        launcher: Child,
        marker: String,
    }

    impl Job {
        fn start(out: &Path, timeout_secs: &str) -> Self {
            let marker = format!("{}-{}", std::process::id(), out.display());
            let launcher = Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(TRAIN_ON_2_PROCESSES)
                .args([
                    "--limit",
                    "2048",
                    "--epochs",
                    "50",
                    "--collective-timeout",
                    timeout_secs,
                ])
                .arg("--out")
                .arg(out)
                .env("KILN_TEST_JOB", &marker)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            Self { launcher, marker }
        }

        /// Waits until both ranks run and have trained a little.
        fn wait_until_training(&self) -> (u32, u32) {
            let start = Instant::now();
            loop {
                let (r0, r1) = (pids_of_rank(&self.marker, 0), pids_of_rank(&self.marker, 1));
                if let (Some(&p0), Some(&p1)) = (r0.first(), r1.first()) {
                    std::thread::sleep(Duration::from_secs(3));
                    return (p0, p1);
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "ranks did not start"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        /// Waits for the launcher, at most `limit`; kills the job if it overruns.
        fn wait(mut self, limit: Duration) -> (Output, Duration) {
            let start = Instant::now();
            while self.launcher.try_wait().unwrap().is_none() {
                if start.elapsed() > limit {
                    let _ = self.launcher.kill();
                    let _ = Command::new("pkill")
                        .args(["-9", "-f", &self.marker])
                        .status();
                    panic!("the launcher did not exit within {limit:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let elapsed = start.elapsed();
            (self.launcher.wait_with_output().unwrap(), elapsed)
        }
    }

    /// Pids of rank `rank` of the job marked `marker` (normally one; none once it is gone).
    fn pids_of_rank(marker: &str, rank: usize) -> Vec<u32> {
        let (marked, ranked) = (
            format!("KILN_TEST_JOB={marker}"),
            format!("OMPI_COMM_WORLD_RANK={rank}"),
        );
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // Unreadable once the process has exited (zombies included).
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
            if vars.contains(&marked.as_bytes()) && vars.contains(&ranked.as_bytes()) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Starts a job with `timeout_secs` as collective timeout, sends `signal` to rank 1 once
    /// both ranks train, and waits at most `limit` for the launcher; checks that no rank is
    /// left and returns the launcher's output and how long it took after the signal.
    fn disrupt_rank_1(timeout_secs: &str, signal: &str, limit: Duration) -> (Output, Duration) {
        let dir = tempfile::tempdir().unwrap();
        let job = Job::start(dir.path(), timeout_secs);
        let (_, victim) = job.wait_until_training();
        let status = Command::new("kill")
            .args([signal, &victim.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {victim}");
        let marker = job.marker.clone();
        let (out, elapsed) = job.wait(limit);
        assert!(
            pids_of_rank(&marker, 0).is_empty() && pids_of_rank(&marker, 1).is_empty(),
            "a rank is left"
        );
        (out, elapsed)
    }

    #[test]
    fn a_killed_rank_stops_the_job_and_is_named() {
        // Within twice the collective timeout.
        let (out, elapsed) = disrupt_rank_1("20", "-9", Duration::from_secs(40));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("kiln launch: the job failed")
                && stderr.contains("rank 1 exited on signal 9"),
            "{stderr}"
        );
        eprintln!("killed rank: launcher exited {elapsed:?} after the kill");
    }

    #[test]
    fn a_stalled_rank_times_out_and_stops_the_job() {
        let (out, elapsed) = disrupt_rank_1("3", "-STOP", Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("rank 0: all_reduce timed out after 3s: rank 1 is stalled"),
            "{stderr}"
        );
        assert!(elapsed >= Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn a_rank_that_fails_stops_the_job() {
        let dir = tempfile::tempdir().unwrap();
        // Rank 1 gets an unreadable data directory; rank 0 trains normally until it is stopped.
        let script = format!(
            "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then set -- --data /nonexistent/mnist; fi; \
             exec {} train cnn-mnist --limit 512 --epochs 50 --out {} \"$@\"",
            env!("CARGO_BIN_EXE_kiln"),
            dir.path().display()
        );
        let start = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["launch", "--nproc-per-node", "2", "--", "sh", "-c", &script])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("[rank 1]") && stderr.contains("/nonexistent/mnist"),
            "{stderr}"
        );
        assert!(stderr.contains("kiln launch: the job failed"), "{stderr}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{:?}",
            start.elapsed()
        );
    }
}
