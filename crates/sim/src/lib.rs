//! Deterministic simulation of converge's replication protocol (DESIGN "Testing tiers", 2).
//!
//! A seed builds a cluster of 3 or 4 nodes and a pool of 2 or 3 replicas, then runs a
//! writer against it while it crashes and restarts nodes, cuts them off, loses, delays and
//! reorders messages, and makes disks slow or failing. Every Raft change, acting set,
//! replica decision and acknowledgement is made by the real pure code (`model`,
//! `volume::admission`, `volume::verdict`). After every step a checker per invariant runs;
//! at the end every fault is healed and the cluster must settle with identical replicas.
//! The same seed replays the same run exactly. Canary mode injects a forbidden event (a
//! write of an old owner straight onto a disk) that the checkers must catch.

mod rng;
mod world;

pub use world::{Canary, Report, Violation};

/// Steps of faults per seed before healing.
pub const STEPS_DEFAULT: usize = 600;

/// Runs one seed; the report, or the first invariant it broke.
pub fn run(seed: u64, steps: usize, canary: Canary) -> Result<Report, Violation> {
    let mut world = world::World::new(seed, canary);
    world.run(steps)?;
    Ok(world.report.clone())
}
