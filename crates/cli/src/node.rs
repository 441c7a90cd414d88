//! `converge node ...` and `converge events`.

use crate::args::NodeCommand;
use crate::output::Output;
use anyhow::{bail, Result};
use api::client::Client;
use model::{VmDesired, VmRunState};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// How long `node drain` waits for the node's VMs to run elsewhere.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn run(api: &Client, out: &Output, command: NodeCommand) -> Result<()> {
    match command {
        NodeCommand::Drain { node, no_wait } => {
            let drain = api.drain_node(&node).await?;
            let id = drain.node;
            if no_wait || drain.vms.is_empty() {
                return out.print(&drain, || match drain.vms.len() {
                    0 => format!("{id} is drained: it runs no VM, and none is placed on it."),
                    n => format!("{id} is drained: {n} VMs are moving off it ({}).", drain.vms.join(", ")),
                });
            }
            let started = Instant::now();
            if !out.json {
                eprint!("moving {} VMs off {id}...", drain.vms.len());
            }
            loop {
                let vms = api.vms().await?;
                let moving: Vec<&api::v1::VmInfo> = vms.iter().filter(|vm| drain.vms.contains(&vm.name)).collect();
                let left = moving.iter().filter(|vm| vm.desired.node() == Some(id)).count();
                let settled = moving.iter().all(|vm| match vm.desired {
                    VmDesired::Running { node } => {
                        node != id && vm.node == Some(node) && matches!(vm.state, VmRunState::Running { .. })
                    }
                    VmDesired::Moving { .. } => false,
                    VmDesired::Stopped => true,
                });
                if left == 0 && settled {
                    if !out.json {
                        eprintln!(" {:.1} s", started.elapsed().as_secs_f64());
                    }
                    let drain = api.drain_node(&node).await?;
                    return out.print(&drain, || {
                        let placed: Vec<String> = moving
                            .iter()
                            .map(|vm| match vm.desired {
                                VmDesired::Running { node } => format!("{} on {node}", vm.name),
                                VmDesired::Moving { .. } | VmDesired::Stopped => format!("{} (stopped)", vm.name),
                            })
                            .collect();
                        format!("{id} is drained; its VMs run elsewhere: {}.", placed.join(", "))
                    });
                }
                if started.elapsed() > DRAIN_TIMEOUT {
                    bail!(
                        "{left} VMs are still on {id} after {} s: see `converge events` for why",
                        DRAIN_TIMEOUT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        NodeCommand::Resume { node } => {
            let drain = api.resume_node(&node).await?;
            out.print(&drain, || format!("{} takes VMs again.", drain.node))
        }
        NodeCommand::Remove { node } => {
            api.remove_node(&node).await?;
            let removed = serde_json::json!({ "removed": node });
            out.print(&removed, || {
                format!(
                    "Removed {node}. Its replicas stay out of their PGs until they are placed anew; a new node may join in its place."
                )
            })
        }
        NodeCommand::Check { node } => {
            let check = api.check_node(&node).await?;
            out.print(&check, || {
                if check.can_go_down {
                    format!(
                        "Yes: {} can go down now; every volume keeps its min_size replicas and its VMs have room elsewhere.",
                        check.node
                    )
                } else {
                    format!("No: {} cannot go down now: {}.", check.node, check.reasons.join("; "))
                }
            })
        }
    }
}

/// Prints the cluster's events, and with `follow` the new ones as they come, until killed.
pub async fn events(api: &Client, out: &Output, follow: bool) -> Result<()> {
    let mut after = 0;
    loop {
        let events = api.events(after).await?;
        for event in &events {
            after = after.max(event.seq);
            if out.json {
                println!("{}", serde_json::to_string(event)?);
            } else {
                println!("{}  {:<14} {}", time(event.at_ms), kind(event.kind), event.message);
            }
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn kind(kind: model::EventKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// `2026-11-30 22:41:33.120 UTC`
fn time(at_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(at_ms);
    let secs = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        at_ms % 1000
    )
}

/// The calendar date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_read_as_utc_dates() {
        assert_eq!(time(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(time(1_796_078_493_120), "2026-11-30 22:41:33.120 UTC");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
    }
}
