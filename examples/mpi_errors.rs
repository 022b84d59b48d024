//! Misused MPI collectives fail on every rank with an error, and the job stays usable: a
//! shard of the wrong length on one rank, then buffers of different lengths, then a correct
//! all-reduce. Run under a launcher (the integration tests do):
//! `kiln launch --nproc-per-node 2 -- target/release/examples/mpi_errors`.

use std::time::Duration;

use anyhow::ensure;
use kiln::multi::collective::mpi::MpiSession;
use kiln::multi::{Collective, CollectiveConfig, ReduceOp};

fn main() -> anyhow::Result<()> {
    let session = MpiSession::init(CollectiveConfig {
        timeout: Duration::from_secs(20),
    })?;
    session.run(|c| -> anyhow::Result<()> {
        let rank = c.rank().index();
        let world = c.world_size().get();
        let mut out = vec![0.0; 4 * world];
        let shard = vec![1.0; if rank == 1 { 3 } else { 4 }];
        match c.all_gather(&shard, &mut out) {
            Err(e) => println!("rank {rank}: all_gather failed: {e}"),
            Ok(()) => anyhow::bail!("rank {rank}: an all_gather with a wrong shard succeeded"),
        }
        let mut buf = vec![1.0; 5 + rank];
        match c.all_reduce(&mut buf, ReduceOp::Sum) {
            Err(e) => println!("rank {rank}: all_reduce failed: {e}"),
            Ok(()) => anyhow::bail!("rank {rank}: an all_reduce of mismatched lengths succeeded"),
        }
        let mut buf = vec![rank as f32 + 1.0; 4];
        c.all_reduce(&mut buf, ReduceOp::Sum)?;
        let expected = (world * (world + 1) / 2) as f32;
        ensure!(buf == vec![expected; 4], "rank {rank}: got {buf:?}");
        println!("rank {rank}: still in step");
        Ok(())
    })?;
    Ok(())
}
