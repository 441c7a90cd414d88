//! `volume import` and `volume export`: streams between a local file and a volume, with a
//! progress bar on a terminal. Imports take any image format `image` knows.

use crate::image::{self, Format};
use crate::output::Output;
use anyhow::{bail, Context, Result};
use api::client::Client;
use api::v1;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// New volumes made by import are rounded up to whole MiB.
const IMPORT_ROUND_BYTES: u64 = 1 << 20;

#[derive(Serialize)]
pub struct TransferReport {
    pub volume: String,
    pub file: String,
    pub format: Format,
    pub bytes: u64,
    pub seconds: f64,
}

impl TransferReport {
    pub fn describe(&self, verb: &str, preposition: &str) -> String {
        let mib_per_s = self.bytes as f64 / (1 << 20) as f64 / self.seconds.max(1e-9);
        let format = match self.format {
            Format::Raw => String::new(),
            format => format!(" ({format})"),
        };
        format!(
            "{verb} {}{format} {preposition} volume {} ({} in {:.1} s, {mib_per_s:.0} MiB/s).",
            self.file,
            self.volume,
            model::format_size(self.bytes),
            self.seconds
        )
    }
}

fn progress(out: &Output, len: u64, what: &str) -> ProgressBar {
    if out.json {
        return ProgressBar::hidden();
    }
    // indicatif draws only when stderr is a terminal.
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Imports `file` into volume `name` (made to fit, with `replicas`, if it does not exist):
/// the disk image it is, in the format its header tells or `format` says.
pub async fn import(
    api: &Client,
    out: &Output,
    name: &str,
    file: &Path,
    replicas: u8,
    format: Option<Format>,
) -> Result<TransferReport> {
    let image = image::inspect(file, format)?;
    let len = image.virtual_size;
    match api.volume(name).await {
        Ok(volume) if volume.size_bytes < len => {
            bail!(
                "{} holds a disk of {len} bytes but volume {name} has only {}: use another volume",
                file.display(),
                volume.size_bytes
            )
        }
        Ok(_) => {}
        Err(e) if e.status() == Some(reqwest_not_found()) => {
            let size_bytes = len.max(1).next_multiple_of(IMPORT_ROUND_BYTES);
            api.create_volume(&v1::CreateVolume { name: name.to_string(), size_bytes, replicas }).await?;
            if !out.json {
                eprintln!("Created volume {name} ({}, {replicas} replicas)", model::format_size(size_bytes));
            }
        }
        Err(e) => return Err(e.into()),
    }
    let what = match image.format {
        Format::Raw => format!("import {name}"),
        format => format!("import {name} ({format})"),
    };
    let bar = progress(out, len, &what);
    let counted = bar.clone();
    let chunks = image::read(&image).await?.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            counted.inc(bytes.len() as u64);
        }
    });
    let started = Instant::now();
    let result = api.import(name, chunks).await;
    bar.finish_and_clear();
    let result = result?;
    if result.bytes != len {
        bail!("the server stored {} bytes of {len}", result.bytes);
    }
    Ok(TransferReport {
        volume: name.into(),
        file: file.display().to_string(),
        format: image.format,
        bytes: len,
        seconds: started.elapsed().as_secs_f64(),
    })
}

pub async fn export(api: &Client, out: &Output, name: &str, file: &Path) -> Result<TransferReport> {
    let started = Instant::now();
    let (len, mut stream) = api.export(name).await?;
    let bar = progress(out, len, &format!("export {name}"));
    let mut target = tokio::fs::File::create(file).await.with_context(|| format!("creating {}", file.display()))?;
    let mut received = 0u64;
    let result: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.context("the export stream broke off (a replica may have failed; see the server's log)")?;
            target.write_all(&chunk).await.with_context(|| format!("writing {}", file.display()))?;
            received += chunk.len() as u64;
            bar.set_position(received);
        }
        target.flush().await?;
        target.sync_all().await.with_context(|| format!("syncing {}", file.display()))?;
        if received != len {
            bail!("the export ended after {received} of {len} bytes");
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    if let Err(e) = result {
        let _ = std::fs::remove_file(file);
        return Err(e);
    }
    Ok(TransferReport {
        volume: name.into(),
        file: file.display().to_string(),
        format: Format::Raw,
        bytes: len,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Copies volume `source` into `into` on the server (made to fit if it does not exist),
/// showing the server's progress.
pub async fn clone(
    api: &Client,
    out: &Output,
    source: &str,
    into: &str,
    replicas: Option<u8>,
) -> Result<v1::VolumeInfo> {
    let request = v1::CloneVolume { into: into.to_string(), replicas };
    let mut lines = api.clone_volume(source, &request).await?;
    let bar = progress(out, 0, &format!("clone {source} into {into}"));
    let outcome = loop {
        match lines.next().await {
            Ok(Some(v1::CloneProgress::Copied { bytes, of })) => {
                bar.set_length(of);
                bar.set_position(bytes);
            }
            Ok(Some(v1::CloneProgress::Done { volume })) => break Ok(volume),
            Ok(Some(v1::CloneProgress::Failed { error })) => break Err(anyhow::anyhow!("{error}")),
            Ok(None) => break Err(anyhow::anyhow!("the server ended the answer without saying how the copy went")),
            Err(e) => break Err(e.into()),
        }
    };
    bar.finish_and_clear();
    outcome.with_context(|| format!("cloning volume {source} into {into}"))
}

fn reqwest_not_found() -> reqwest::StatusCode {
    reqwest::StatusCode::NOT_FOUND
}
