//! Pipeline schedules as data: for each stage, the ordered list of forward and backward passes
//! over micro-batches. Pure functions, so they are tested without tensors and one executor runs
//! every schedule.

use std::num::NonZeroUsize;

/// One unit of a stage's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PipelineOp {
    /// Forward pass of micro-batch `i`.
    Forward(usize),
    /// Backward pass of micro-batch `i`.
    Backward(usize),
}

/// How micro-batches are ordered through the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PipelineSchedule {
    /// No micro-batches: the whole batch goes forward through every stage, then backward
    /// (the hand-written model-parallel split; stages wait for each other).
    Naive,
    /// GPipe: all micro-batches forward, then all backward. Keeps `m` activations per stage.
    GPipe,
    /// One-forward-one-backward (PipeDream-Flush): after a warm-up, each stage alternates, so a
    /// stage holds at most `p - stage` activations instead of `m`. Same bubble as GPipe.
    OneFOneB,
}

impl PipelineSchedule {
    /// The micro-batches this schedule splits a batch into, given the requested count.
    pub fn micro_batches(self, requested: NonZeroUsize) -> NonZeroUsize {
        match self {
            PipelineSchedule::Naive => NonZeroUsize::MIN,
            PipelineSchedule::GPipe | PipelineSchedule::OneFOneB => requested,
        }
    }

    /// The ops of `stage` (0-based) in a pipeline of `stages` stages over `micro` micro-batches,
    /// in execution order. Every stage runs each forward and each backward exactly once;
    /// forwards and backwards each go in micro-batch order, so messages between neighbours
    /// arrive in the order they are needed.
    pub fn stage_ops(
        self,
        stages: NonZeroUsize,
        stage: usize,
        micro: NonZeroUsize,
    ) -> Vec<PipelineOp> {
        let m = self.micro_batches(micro).get();
        match self {
            PipelineSchedule::Naive | PipelineSchedule::GPipe => (0..m)
                .map(PipelineOp::Forward)
                .chain((0..m).map(PipelineOp::Backward))
                .collect(),
            PipelineSchedule::OneFOneB => {
                let warmup = (stages.get() - 1).saturating_sub(stage).min(m);
                let mut ops: Vec<PipelineOp> = (0..warmup).map(PipelineOp::Forward).collect();
                for i in 0..m - warmup {
                    ops.push(PipelineOp::Forward(warmup + i));
                    ops.push(PipelineOp::Backward(i));
                }
                ops.extend((m - warmup..m).map(PipelineOp::Backward));
                ops
            }
        }
    }
}

/// The most micro-batches whose activations a stage holds at once (forwarded, not yet
/// backwarded) when it runs `ops`.
pub fn peak_in_flight(ops: &[PipelineOp]) -> usize {
    let (mut now, mut peak) = (0usize, 0usize);
    for op in ops {
        match op {
            PipelineOp::Forward(_) => {
                now += 1;
                peak = peak.max(now);
            }
            PipelineOp::Backward(_) => now = now.saturating_sub(1),
        }
    }
    peak
}

/// The idle fraction of a pipeline of `stages` equal stages over `micro` micro-batches, in
/// theory: `(p - 1) / (m + p - 1)`.
pub fn theoretical_bubble(stages: NonZeroUsize, micro: NonZeroUsize) -> f64 {
    let (p, m) = (stages.get() as f64, micro.get() as f64);
    (p - 1.0) / (m + p - 1.0)
}

#[cfg(test)]
mod tests {
    use super::PipelineOp::{Backward as B, Forward as F};
    use super::*;

    fn n(x: usize) -> NonZeroUsize {
        NonZeroUsize::new(x).unwrap()
    }

    #[test]
    fn gpipe_runs_all_forwards_then_all_backwards() {
        let ops = PipelineSchedule::GPipe.stage_ops(n(2), 0, n(3));
        assert_eq!(ops, vec![F(0), F(1), F(2), B(0), B(1), B(2)]);
        assert_eq!(peak_in_flight(&ops), 3);
        assert_eq!(
            PipelineSchedule::Naive.stage_ops(n(2), 1, n(8)),
            vec![F(0), B(0)]
        );
    }

    #[test]
    fn one_f_one_b_warms_up_then_alternates() {
        // 4 stages, 6 micro-batches: stage 0 warms up with 3 forwards, the last stage with none.
        let first = PipelineSchedule::OneFOneB.stage_ops(n(4), 0, n(6));
        assert_eq!(
            first,
            vec![
                F(0),
                F(1),
                F(2),
                F(3),
                B(0),
                F(4),
                B(1),
                F(5),
                B(2),
                B(3),
                B(4),
                B(5)
            ]
        );
        let last = PipelineSchedule::OneFOneB.stage_ops(n(4), 3, n(6));
        assert_eq!(
            last,
            vec![
                F(0),
                B(0),
                F(1),
                B(1),
                F(2),
                B(2),
                F(3),
                B(3),
                F(4),
                B(4),
                F(5),
                B(5)
            ]
        );
        // Fewer micro-batches than stages: the warm-up is cut short.
        let short = PipelineSchedule::OneFOneB.stage_ops(n(4), 0, n(2));
        assert_eq!(short, vec![F(0), F(1), B(0), B(1)]);
    }

    #[test]
    fn every_op_runs_once_and_one_f_one_b_bounds_activations_by_stages() {
        for p in 1..=4 {
            for m in 1..=9 {
                for s in 0..p {
                    for schedule in [PipelineSchedule::GPipe, PipelineSchedule::OneFOneB] {
                        let ops = schedule.stage_ops(n(p), s, n(m));
                        let mut forwards: Vec<usize> = ops
                            .iter()
                            .filter_map(|o| match o {
                                F(i) => Some(*i),
                                B(_) => None,
                            })
                            .collect();
                        let backwards: Vec<usize> = ops
                            .iter()
                            .filter_map(|o| match o {
                                B(i) => Some(*i),
                                F(_) => None,
                            })
                            .collect();
                        assert_eq!(forwards, (0..m).collect::<Vec<_>>());
                        assert_eq!(backwards, (0..m).collect::<Vec<_>>());
                        // A micro-batch goes backward only after its forward.
                        for (k, op) in ops.iter().enumerate() {
                            if let B(i) = op {
                                assert!(ops[..k].contains(&F(*i)));
                            }
                        }
                        forwards.clear();
                        let peak = peak_in_flight(&ops);
                        match schedule {
                            PipelineSchedule::GPipe => assert_eq!(peak, m),
                            _ => assert!(peak <= (p - s).min(m), "p {p} m {m} s {s}: {peak}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn theory_matches_the_textbook_bubble() {
        assert_eq!(theoretical_bubble(n(2), n(1)), 0.5);
        assert_eq!(theoretical_bubble(n(2), n(4)), 0.2);
        assert_eq!(theoretical_bubble(n(1), n(4)), 0.0);
    }
}
