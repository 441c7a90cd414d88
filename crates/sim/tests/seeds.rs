//! The simulator as part of `make test`: a bounded number of seeds with no violation, the
//! canary caught on every seed, and a seed that replays exactly.

use sim::{run, Canary, STEPS_DEFAULT};

/// Seeds `make test` runs; `make sim SEEDS=N` runs many more.
const SEEDS: u64 = 200;
const CANARY_SEEDS: u64 = 30;

#[test]
fn no_seed_breaks_an_invariant() {
    for seed in 0..SEEDS {
        if let Err(violation) = run(seed, STEPS_DEFAULT, Canary::Off) {
            panic!("seed {seed} broke an invariant at step {}: {}", violation.step, violation.what);
        }
    }
}

#[test]
fn the_canary_is_caught_on_every_seed() {
    for seed in 0..CANARY_SEEDS {
        let caught = run(seed, STEPS_DEFAULT, Canary::StaleOwnerWrite);
        assert!(caught.is_err(), "seed {seed}: a stale owner's write went unnoticed");
    }
}

#[test]
fn a_seed_replays_exactly() {
    let first = run(7, STEPS_DEFAULT, Canary::Off).expect("seed 7 passes");
    let again = run(7, STEPS_DEFAULT, Canary::Off).expect("seed 7 passes");
    assert_eq!(first, again);
    assert!(first.writes_acked > 0 && first.faults > 0, "the seed did something: {first:?}");
}
