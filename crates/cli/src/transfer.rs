//! `volume import` and `volume export`: streams between a local file and a volume, with a
//! progress bar on a terminal. qcow2 images are turned into raw by `qemu-img` first.

use crate::output::Output;
use anyhow::{bail, Context, Result};
use api::client::Client;
use api::v1;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// New volumes made by import are rounded up to whole MiB.
const IMPORT_ROUND_BYTES: u64 = 1 << 20;

#[derive(Serialize)]
pub struct TransferReport {
    pub volume: String,
    pub file: String,
    pub bytes: u64,
    pub seconds: f64,
}

impl TransferReport {
    pub fn describe(&self, verb: &str, preposition: &str) -> String {
        let mib_per_s = self.bytes as f64 / (1 << 20) as f64 / self.seconds.max(1e-9);
        format!(
            "{verb} {} {preposition} volume {} ({} in {:.1} s, {mib_per_s:.0} MiB/s).",
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

/// A raw image to upload: the file itself, or a temporary raw conversion of a qcow2 one.
struct RawImage {
    path: PathBuf,
    temporary: bool,
}

impl Drop for RawImage {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn raw_image(file: &Path, out: &Output) -> Result<RawImage> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let is_qcow2 = f.read_exact(&mut magic).is_ok() && magic == QCOW2_MAGIC;
    if !is_qcow2 {
        return Ok(RawImage { path: file.to_path_buf(), temporary: false });
    }
    let path = std::env::temp_dir().join(format!("converge-import-{}.raw", std::process::id()));
    if !out.json {
        eprintln!("{} is qcow2: converting to raw with qemu-img first", file.display());
    }
    let raw = RawImage { path, temporary: true };
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(file)
        .arg(&raw.path)
        .status()
        .context("running qemu-img (install the qemu-utils package)")?;
    if !status.success() {
        bail!("qemu-img could not convert {} ({status})", file.display());
    }
    Ok(raw)
}

pub async fn import(api: &Client, out: &Output, name: &str, file: &Path, replicas: u8) -> Result<TransferReport> {
    let raw = raw_image(file, out)?;
    let len = std::fs::metadata(&raw.path).with_context(|| format!("reading {}", raw.path.display()))?.len();
    match api.volume(name).await {
        Ok(volume) if volume.size_bytes < len => {
            bail!(
                "{} holds {len} bytes but volume {name} has only {}: use another volume",
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
    let bar = progress(out, len, &format!("import {name}"));
    let reader = tokio::fs::File::open(&raw.path).await.with_context(|| format!("opening {}", raw.path.display()))?;
    let counted = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20).inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            counted.inc(bytes.len() as u64);
        }
    });
    let started = Instant::now();
    let result = api.import(name, stream).await;
    bar.finish_and_clear();
    let result = result?;
    if result.bytes != len {
        bail!("the server stored {} bytes of {len}", result.bytes);
    }
    Ok(TransferReport {
        volume: name.into(),
        file: file.display().to_string(),
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
        bytes: len,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn reqwest_not_found() -> reqwest::StatusCode {
    reqwest::StatusCode::NOT_FOUND
}
