use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::checkpoint::EpochMetrics;

/// How much a run prints on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Nothing.
    Quiet,
    /// One line per epoch.
    Epochs,
    /// One line per epoch and a live progress bar (shown only on a terminal).
    Bar,
}

/// Progress of a training run, drawn on stderr.
pub struct Progress {
    verbosity: Verbosity,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A reporter printing at `verbosity`.
    pub fn new(verbosity: Verbosity) -> Self {
        Self {
            verbosity,
            bar: None,
        }
    }

    /// Prints a log line on stderr (unless quiet), above the bar if one is drawn.
    pub fn log(&self, line: &str) {
        match (&self.bar, self.verbosity) {
            (_, Verbosity::Quiet) => {}
            (Some(bar), _) => bar.println(line),
            (None, _) => eprintln!("{line}"),
        }
    }

    pub(crate) fn start_epoch(&mut self, epoch: usize, epochs: usize, batches: usize) {
        if self.verbosity != Verbosity::Bar {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(batches as u64), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} batches {msg} ({elapsed}<{eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{epoch}/{epochs}"));
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    pub(crate) fn batch_done(&self, loss: f64, samples_per_sec: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4} | {samples_per_sec:.0} samples/s"));
            bar.inc(1);
        }
    }

    pub(crate) fn evaluating(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message("evaluating on the test set");
        }
    }

    pub(crate) fn end_epoch(&mut self, epochs: usize, metrics: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let mut line = format!(
            "epoch {}/{epochs}: train loss {:.4} | test loss {:.4}",
            metrics.epoch, metrics.train_loss, metrics.test_loss,
        );
        if let Some(accuracy) = metrics.test_accuracy {
            line += &format!(" | test accuracy {:.2}%", 100.0 * accuracy);
        }
        for (name, value) in &metrics.test_metrics {
            line += &format!(" | test {name} {value:.4}");
        }
        line += &format!(" | {:.0} samples/s", metrics.samples_per_sec);
        self.log(&line);
    }
}
