//! Text and JSON output.

use api::v1;
use model::format_size;
use serde::Serialize;
use std::fmt::Write;

pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn print<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            println!("{}", text());
        }
        Ok(())
    }
}

pub fn cluster_status(status: &v1::ClusterStatus) -> String {
    let mut out = String::new();
    let id = status.cluster_id.map(|c| c.to_string()).unwrap_or_else(|| "(not initialised)".into());
    let health = if status.healthy { "healthy".to_string() } else { "DEGRADED".to_string() };
    let _ = writeln!(out, "cluster {id}: {health}");
    for problem in &status.problems {
        let _ = writeln!(out, "  ! {problem}");
    }
    let _ = writeln!(
        out,
        "\n{:<18} {:<6} {:<22} {:<6} {:>6} {:>12} {:>12}",
        "NODE", "STATE", "ADDRESS", "ROLE", "DISKS", "USED", "FREE"
    );
    for node in &status.nodes {
        let state = if node.up { "up" } else { "down" };
        let mut role = if node.voter { "voter" } else { "learner" }.to_string();
        if status.leader == Some(node.id) {
            role = "leader".into();
        }
        let capacity: u64 = node.disks.iter().map(|d| d.capacity_bytes).sum();
        let used: Option<u64> = node.disks.iter().map(|d| d.used_bytes).sum();
        let (used, free) = match used {
            Some(used) => (format_size(used), format_size(capacity.saturating_sub(used))),
            None => ("?".into(), "?".into()),
        };
        let me = if node.id == status.this_node { "*" } else { "" };
        let _ = writeln!(
            out,
            "{:<18} {:<6} {:<22} {:<6} {:>6} {:>12} {:>12}",
            format!("{}{me}", node.id),
            state,
            node.api_addr,
            role,
            node.disks.len(),
            used,
            free
        );
        for disk in &node.disks {
            let health = match &disk.health {
                Some(model::DiskHealth::Ok) => "ok".to_string(),
                Some(model::DiskHealth::Failed(reason)) => format!("FAILED: {reason}"),
                None => "unknown (node down)".into(),
            };
            let _ = writeln!(out, "    {} {} ({}, {})", disk.id, disk.path, format_size(disk.capacity_bytes), health);
        }
    }
    out.trim_end().to_string()
}

pub fn volume_table(volumes: &[v1::VolumeInfo]) -> String {
    let mut out = format!("{:<24} {:>12} {:>8} {:<16} {:>6}", "NAME", "SIZE", "REPLICAS", "OWNER", "EPOCH");
    for v in volumes {
        let owner = v.owner.map(|o| o.to_string()).unwrap_or_else(|| "-".into());
        let _ = write!(
            out,
            "\n{:<24} {:>12} {:>8} {:<16} {:>6}",
            v.name,
            format_size(v.size_bytes),
            v.replicas,
            owner,
            v.owner_epoch.0
        );
    }
    out
}

pub fn network_table(networks: &[v1::NetworkInfo]) -> String {
    let mut out = format!("{:<24} {:<40} VMS", "NAME", "KIND");
    for n in networks {
        let vms = if n.vms.is_empty() { "-".to_string() } else { n.vms.join(",") };
        let _ = write!(out, "\n{:<24} {:<40} {vms}", n.name, n.kind.to_string());
        for gap in &n.unavailable {
            let _ = write!(out, "\n  not on {}: {}", gap.node, gap.reason);
        }
    }
    out
}

pub fn volume_details(v: &v1::VolumeInfo) -> String {
    let owner = v.owner.map(|o| o.to_string()).unwrap_or_else(|| "none".into());
    let mut text = format!(
        "name:        {}\nid:          {}\nsize:        {} ({} bytes)\npool:        {} ({} replicas, writes need {})\nowner:       {owner}\nowner epoch: {}",
        v.name, v.id, format_size(v.size_bytes), v.size_bytes, v.pool_name, v.replicas, v.min_size, v.owner_epoch.0
    );
    if v.degraded.is_empty() {
        text.push_str("\nhealth:      whole");
    } else {
        text.push_str(&format!("\nhealth:      degraded ({} of {} PGs)", v.pgs_degraded, v.pgs));
        for line in &v.degraded {
            text.push_str(&format!("\n  {line}"));
        }
    }
    text
}
