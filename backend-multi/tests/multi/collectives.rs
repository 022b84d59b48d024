//! Every collective against values computed directly, for lengths that do not divide by the
//! world size (0 and 1 included), and failure handling: a peer that panics, stalls, leaves
//! or disagrees makes the others fail within the timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_multi::{
    Collective, CollectiveConfig, InProcessCollective, MultiError, Rank, ReduceOp, WorldSize,
    run_in_process, shard_range,
};

const LENGTHS: [usize; 6] = [0, 1, 2, 7, 1000, 5003];

fn run<T: Send>(
    world: usize,
    f: impl Fn(Arc<dyn Collective>) -> Result<T, MultiError> + Sync,
) -> Result<Vec<T>, MultiError> {
    let config = CollectiveConfig {
        timeout: Duration::from_secs(10),
    };
    run_in_process(WorldSize::new(world).unwrap(), config, f)
}

/// Rank `r`'s input: small integers (exact in f32 sums), different on every rank.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 23) as f32 - 11.0)
        .collect()
}

fn expected(world: usize, len: usize, op: ReduceOp) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let values = (0..world).map(|r| input(r, len)[i]);
            match op {
                ReduceOp::Sum => values.sum(),
                ReduceOp::Avg => values.sum::<f32>() / world as f32,
                ReduceOp::Max => values.fold(f32::NEG_INFINITY, f32::max),
            }
        })
        .collect()
}

fn rank(r: usize, world: usize) -> Rank {
    Rank::new(r, WorldSize::new(world).unwrap()).unwrap()
}

#[test]
fn all_reduce_gives_every_rank_the_reduction() {
    for world in 1..=4 {
        for len in LENGTHS {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                let results = run(world, |c| {
                    let mut buf = input(c.rank().index(), len);
                    c.all_reduce(&mut buf, op)?;
                    Ok(buf)
                })
                .unwrap();
                let want = expected(world, len, op);
                for (r, got) in results.iter().enumerate() {
                    assert_eq!(got, &want, "world {world}, len {len}, {op:?}, rank {r}");
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_shard() {
    for world in 1..=4 {
        for len in LENGTHS {
            let results = run(world, |c| {
                let buf = input(c.rank().index(), len);
                let range = shard_range(len, c.world_size(), c.rank());
                let mut shard = vec![f32::NAN; range.len()];
                c.reduce_scatter(&buf, &mut shard, ReduceOp::Sum)?;
                Ok(shard)
            })
            .unwrap();
            let want = expected(world, len, ReduceOp::Sum);
            let gathered: Vec<f32> = results.concat();
            assert_eq!(gathered, want, "world {world}, len {len}");
        }
    }
}

#[test]
fn all_gather_concatenates_shards_in_rank_order() {
    for world in 1..=4 {
        for len in LENGTHS {
            let results = run(world, |c| {
                let range = shard_range(len, c.world_size(), c.rank());
                let shard: Vec<f32> = range.map(|i| i as f32 * 0.5).collect();
                let mut out = vec![f32::NAN; len];
                c.all_gather(&shard, &mut out)?;
                Ok(out)
            })
            .unwrap();
            let want: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
            for got in results {
                assert_eq!(got, want, "world {world}, len {len}");
            }
        }
    }
}

#[test]
fn broadcast_copies_the_root_buffer() {
    for world in 1..=4 {
        for root in 0..world {
            for len in LENGTHS {
                let results = run(world, |c| {
                    let mut buf = input(c.rank().index(), len);
                    c.broadcast(&mut buf, rank(root, world))?;
                    Ok(buf)
                })
                .unwrap();
                for got in results {
                    assert_eq!(
                        got,
                        input(root, len),
                        "world {world}, root {root}, len {len}"
                    );
                }
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_slowest_rank() {
    let start = Instant::now();
    let results = run(3, |c| {
        std::thread::sleep(Duration::from_millis(100 * c.rank().index() as u64));
        c.barrier()?;
        Ok(start.elapsed())
    })
    .unwrap();
    for passed in results {
        assert!(
            passed >= Duration::from_millis(200),
            "passed after {passed:?}"
        );
    }
}

#[test]
fn many_collectives_in_a_row_stay_in_step() {
    let results = run(3, |c| {
        let mut total = 0.0f32;
        for step in 0..200 {
            let mut buf = vec![(c.rank().index() + step) as f32; 5];
            c.all_reduce(&mut buf, ReduceOp::Sum)?;
            total += buf[4];
            c.barrier()?;
        }
        Ok(total)
    })
    .unwrap();
    // Sum over steps of (0+1+2 + 3*step) = 200*3 + 3*(199*200/2).
    let want = 200.0 * 3.0 + 3.0 * 19_900.0;
    assert!(results.iter().all(|&t| t == want), "{results:?}");
}

/// Runs rank 0's closure and rank 1's on raw threads, returning both results.
fn two_ranks<A: Send, B: Send>(
    timeout: Duration,
    rank0: impl FnOnce(InProcessCollective) -> A + Send,
    rank1: impl FnOnce(InProcessCollective) -> B + Send,
) -> (A, std::thread::Result<B>) {
    let mut handles =
        InProcessCollective::group(WorldSize::new(2).unwrap(), CollectiveConfig { timeout });
    let h1 = handles.pop().unwrap();
    let h0 = handles.pop().unwrap();
    std::thread::scope(|s| {
        let t1 = s.spawn(move || rank1(h1));
        let a = rank0(h0);
        (a, t1.join())
    })
}

/// An all-reduce of 16 ones, and how long it took to return.
fn timed_all_reduce(c: InProcessCollective) -> (Result<(), MultiError>, Duration) {
    let start = Instant::now();
    let mut buf = vec![1.0; 16];
    (c.all_reduce(&mut buf, ReduceOp::Sum), start.elapsed())
}

#[test]
fn a_panicking_peer_fails_the_others_at_once() {
    let timeout = Duration::from_secs(30);
    let (result, peer) = two_ranks(timeout, timed_all_reduce, |c| {
        let _keep = &c;
        std::thread::sleep(Duration::from_millis(50));
        panic!("rank 1 exploded");
    });
    assert!(peer.is_err(), "rank 1 should have panicked");
    let (result, waited) = result;
    match result {
        Err(MultiError::PeerFailed {
            rank: 0,
            op: "all_reduce",
            reason,
        }) => {
            assert!(reason.contains("rank 1 panicked"), "{reason}");
        }
        other => panic!("expected PeerFailed, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
}

#[test]
fn a_stalled_peer_times_out_and_then_fails_too() {
    let timeout = Duration::from_millis(300);
    let (result, peer) = two_ranks(timeout, timed_all_reduce, |c| {
        std::thread::sleep(Duration::from_millis(1500));
        let mut buf = vec![1.0; 16];
        c.all_reduce(&mut buf, ReduceOp::Sum)
    });
    let (result, waited) = result;
    assert!(
        matches!(&result, Err(MultiError::Timeout { rank: 0, missing, .. }) if missing == &vec![1]),
        "{result:?}"
    );
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(1),
        "{waited:?}"
    );
    // The late rank finds the group failed instead of waiting for rank 0 forever.
    let late = peer.unwrap();
    assert!(
        matches!(&late, Err(MultiError::PeerFailed { rank: 1, reason, .. }) if reason.contains("timed out")),
        "{late:?}"
    );
}

#[test]
fn a_peer_that_leaves_fails_pending_calls() {
    let (result, _) = two_ranks(
        Duration::from_secs(30),
        |c| {
            let start = Instant::now();
            (c.barrier(), start.elapsed())
        },
        |c| {
            std::thread::sleep(Duration::from_millis(50));
            drop(c);
        },
    );
    let (result, waited) = result;
    assert!(
        matches!(&result, Err(MultiError::PeerFailed { reason, .. }) if reason.contains("rank 1 left")),
        "{result:?}"
    );
    assert!(waited < Duration::from_secs(5));
}

#[test]
fn mismatched_calls_fail_on_every_rank() {
    let outcomes: Vec<_> = {
        let handles =
            InProcessCollective::group(WorldSize::new(2).unwrap(), CollectiveConfig::default());
        std::thread::scope(|s| {
            let threads: Vec<_> = handles
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut buf = vec![0.0; 4 + c.rank().index()];
                        c.all_reduce(&mut buf, ReduceOp::Sum)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    };
    for outcome in outcomes {
        assert!(
            matches!(outcome, Err(MultiError::Mismatch { .. })),
            "{outcome:?}"
        );
    }
}

#[test]
fn a_shard_of_the_wrong_length_is_an_error_for_everyone() {
    let err = run(2, |c| {
        let wrong = if c.rank().index() == 1 { 3 } else { 2 };
        let mut out = vec![0.0; 4];
        c.all_gather(&vec![0.0; wrong], &mut out)
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            MultiError::BufferLength {
                rank: 1,
                expected: 2,
                got: 3,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn run_in_process_reports_the_first_failure_not_its_echoes() {
    let err = run(3, |c| {
        if c.rank().index() == 2 {
            panic!("bad batch on rank 2");
        }
        c.barrier()
    })
    .unwrap_err();
    assert!(
        matches!(&err, MultiError::RankPanicked { rank: 2, message } if message.contains("bad batch")),
        "{err:?}"
    );
}

#[test]
fn the_self_test_passes_on_the_in_process_engine() {
    for world in 1..=4 {
        let reports = run(world, |c| kiln_multi::collective::verify_collective(&*c)).unwrap();
        // 6 lengths x (3 all-reduces + 3 reduce-scatters + broadcast + all-gather) + barrier.
        assert!(reports.iter().all(|r| r.calls == 6 * 8 + 1), "{reports:?}");
    }
}

/// An engine whose all-gather is off by one element on rank 0: the self-test must notice.
struct OffByOne(Arc<dyn Collective>);

impl Collective for OffByOne {
    fn rank(&self) -> Rank {
        self.0.rank()
    }
    fn world_size(&self) -> WorldSize {
        self.0.world_size()
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), MultiError> {
        self.0.all_reduce(buf, op)
    }
    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<(), MultiError> {
        self.0.broadcast(buf, root)
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), MultiError> {
        self.0.all_gather(shard, out)?;
        if self.rank() == Rank::ZERO && out.len() > 5 {
            out[5] += 1.0;
        }
        Ok(())
    }
    fn reduce_scatter(
        &self,
        buf: &[f32],
        shard: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), MultiError> {
        self.0.reduce_scatter(buf, shard, op)
    }
    fn barrier(&self) -> Result<(), MultiError> {
        self.0.barrier()
    }
}

#[test]
fn the_self_test_catches_a_wrong_result() {
    let err = run(2, |c| {
        let faulty = OffByOne(c);
        kiln_multi::collective::verify_collective(&faulty)
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("all_gather") && text.contains("element 5"),
        "{text}"
    );
}
