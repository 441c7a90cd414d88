//! `sim [SEEDS] [FIRST_SEED]`: runs seeds until one breaks an invariant, then prints it so it
//! replays with `sim 1 SEED`; otherwise prints seeds per second. `make sim SEEDS=N`.

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let seeds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let first: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let started = Instant::now();
    let mut totals = sim::Report::default();
    for seed in first..first + seeds {
        match sim::run(seed, sim::STEPS_DEFAULT, sim::Canary::Off) {
            Ok(report) => {
                totals.writes_acked += report.writes_acked;
                totals.writes_unknown += report.writes_unknown;
                totals.faults += report.faults;
                totals.owners += report.owners;
                totals.resyncs += report.resyncs;
            }
            Err(violation) => {
                eprintln!("seed {seed} broke an invariant at step {}: {}", violation.step, violation.what);
                eprintln!("replay: cargo run --release -p sim -- 1 {seed}");
                std::process::exit(1);
            }
        }
    }
    let canaries = (first..first + seeds.min(100))
        .filter(|&s| sim::run(s, sim::STEPS_DEFAULT, sim::Canary::StaleOwnerWrite).is_err())
        .count();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "sim: {seeds} seeds, {:.0} seeds/s, 0 violations; writes acknowledged {}, unknown {}, faults {}, owners {}, resyncs {}; canary caught {canaries} of {}",
        seeds as f64 / elapsed,
        totals.writes_acked,
        totals.writes_unknown,
        totals.faults,
        totals.owners,
        totals.resyncs,
        seeds.min(100)
    );
    if canaries as u64 != seeds.min(100) {
        eprintln!("the canary was missed: the checkers are blind");
        std::process::exit(1);
    }
}
