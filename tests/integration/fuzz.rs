//! The reader fuzzer's regression inputs (`tests/data/fuzz/regressions/READER/*`), each once
//! a finding or a probe of one: every reader refuses them with an error, never a panic; and a
//! short seeded pass of every reader (the long one: `cargo bench --bench fuzz_readers`).

use kiln::fuzz::{fuzz, run_one, targets};

use crate::common::repo;

#[test]
fn every_regression_input_is_refused_cleanly() {
    let scratch = tempfile::tempdir().unwrap();
    let mut replayed = 0;
    for target in targets() {
        let dir = repo("tests/data/fuzz/regressions").join(target.name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let (result, _, allocated) = run_one(&target, &input, scratch.path());
            // Far below what the headers claim (the PNG: 8000 x 8000 pixels, 64 MB).
            assert!(
                allocated < 32 << 20,
                "{}: {allocated} bytes",
                path.display()
            );
            match result {
                Ok(Err(_)) => replayed += 1,
                Ok(Ok(())) => panic!("{} was accepted", path.display()),
                Err(panic) => panic!("{} panicked: {panic}", path.display()),
            }
        }
    }
    assert!(replayed >= 1, "no regression inputs found");
}

#[test]
fn a_short_seeded_pass_finds_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let findings = scratch.path().join("findings");
    for target in targets() {
        let dir = scratch.path().join(target.name);
        let outcome = fuzz(&target, 300, 11, (&dir, &findings)).unwrap();
        assert!(
            outcome.panics.is_empty(),
            "{}: {:?}",
            target.name,
            outcome.panics
        );
        // The seeds' own mutations keep some inputs valid: the reader was reached.
        assert!(outcome.accepted > 0, "{} accepted nothing", target.name);
    }
}
