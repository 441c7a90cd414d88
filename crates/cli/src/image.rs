//! Disk images as people download them. The format is told by the file's own header, never
//! by its name and never guessed: a file whose header is none of the formats below is
//! refused, unless the user says it is raw. An image is checked with QEMU's own tools
//! (`qemu-img info`, `check`, `map`) before a byte is sent, so a truncated or corrupt one
//! is refused with QEMU's reason rather than imported with holes, and then read as the
//! raw disk it describes, through `qemu-nbd` on a private socket: streamed, never
//! converted into a temporary copy first.

use crate::nbd;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// The image formats converge imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The disk's bytes as they are (a partition table, a file system or an ISO 9660 image
    /// at the start tells it; anything else needs `--format raw`).
    Raw,
    /// QEMU's copy-on-write format (most Linux cloud images).
    Qcow2,
    /// VMware's disks (sparse, stream-optimised or a descriptor with its extents).
    Vmdk,
    /// Hyper-V's current format.
    Vhdx,
    /// VirtualBox's format.
    Vdi,
    /// Virtual PC / Hyper-V / Azure VHD, fixed or dynamic.
    Vhd,
}

/// What `detect` names when the header is none of the formats.
pub const SUPPORTED: &str = "qcow2, vmdk, vhdx, vdi, vhd, or raw";

impl Format {
    /// QEMU's name for the format.
    fn qemu(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Vhd => "vpc",
        }
    }

    /// Whether `qemu-img check` knows the format.
    fn checkable(self) -> bool {
        matches!(self, Format::Qcow2 | Format::Vmdk | Format::Vhdx | Format::Vdi)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Format::Vhd => "vhd",
            other => other.qemu(),
        };
        f.write_str(name)
    }
}

/// How many bytes of the file's start `detect` looks at.
pub const HEAD_BYTES: usize = store::claim::PROBE_BYTES;
/// How many of its last bytes (a fixed VHD's footer).
pub const TAIL_BYTES: usize = 512;

/// The format `head` (the file's first bytes) and `tail` (its last 512) say the file is.
/// Raw is named only for a start that a disk or a file system would have (a partition
/// table, a file system's superblock, an ISO 9660 descriptor) or a blank one.
pub fn detect(head: &[u8], tail: &[u8]) -> std::result::Result<Format, String> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        return Ok(Format::Qcow2);
    }
    if at(0, b"KDMV") || at(0, b"COWD") {
        return Ok(Format::Vmdk);
    }
    if at(0, b"# Disk DescriptorFile") {
        return Err("it is a VMDK descriptor, which names other files to read (and could name any file of this \
                    machine): import a single-file image, made with `qemu-img convert -O vmdk DESCRIPTOR ONE.vmdk`"
            .into());
    }
    if at(0, b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return Ok(Format::Vdi);
    }
    // A dynamic VHD starts with a copy of its footer; a fixed one is raw bytes and a footer.
    if at(0, b"conectix") || (tail.len() == TAIL_BYTES && tail.starts_with(b"conectix")) {
        return Ok(Format::Vhd);
    }
    if store::claim::signature(head).is_some() || head.iter().all(|b| *b == 0) {
        return Ok(Format::Raw);
    }
    let shown: String = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(format!(
        "its header (starting {shown}) is none of the image formats converge knows ({SUPPORTED}: a raw image \
         is told by the partition table, file system or ISO 9660 header at its start)"
    ))
}

/// An image checked and ready to read.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    pub format: Format,
    /// The size of the disk it describes.
    pub virtual_size: u64,
}

/// Reads `file`'s header, tells its format (or takes `format` from the user) and checks the
/// image with QEMU's tools.
pub fn inspect(file: &Path, format: Option<Format>) -> Result<Image> {
    use std::io::{Read, Seek, SeekFrom};
    let path = std::path::absolute(file).with_context(|| format!("finding {}", file.display()))?;
    let mut f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let format = match format {
        Some(format) => format,
        None => {
            let mut head = vec![0u8; HEAD_BYTES.min(len as usize)];
            f.read_exact(&mut head).with_context(|| format!("reading {}", path.display()))?;
            let mut tail = vec![0u8; if len >= TAIL_BYTES as u64 { TAIL_BYTES } else { 0 }];
            f.seek(SeekFrom::End(-(tail.len() as i64)))?;
            f.read_exact(&mut tail)?;
            detect(&head, &tail).map_err(|why| {
                anyhow::anyhow!("{} is not an image converge can import: {why}; if it is a raw disk image, say so with --format raw", path.display())
            })?
        }
    };
    if format == Format::Raw {
        return Ok(Image { path, format, virtual_size: len });
    }
    let info = qemu_img(&["info", "--output=json", "-f", format.qemu()], &path)
        .with_context(|| format!("{} is not a readable {format} image", path.display()))?;
    let info: serde_json::Value = serde_json::from_str(&info).context("qemu-img info printed no JSON")?;
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        bail!(
            "{} is a {format} image on top of another ({backing}): import a standalone copy, made with \
             `qemu-img convert -O {} {} FLAT`",
            path.display(),
            format.qemu(),
            path.display()
        );
    }
    // An image whose data lives in other files could name any file of this machine (the
    // CLI often runs as root on a node): only images that are one file are taken.
    let specific = &info["format-specific"]["data"];
    if let Some(data_file) = specific.get("data-file").and_then(|d| d.as_str()) {
        bail!(
            "{} keeps its data in another file ({data_file}): import a standalone copy, made with `qemu-img convert`",
            path.display()
        );
    }
    if let Some(extents) = specific.get("extents").and_then(|e| e.as_array()) {
        let elsewhere = extents
            .iter()
            .filter_map(|e| e.get("filename").and_then(|f| f.as_str()))
            .find(|f| std::path::Path::new(f) != path);
        if let Some(other) = elsewhere {
            bail!("{} reads its data from another file ({other}): import a single-file image", path.display());
        }
    }
    if info.get("encrypted").and_then(|e| e.as_bool()) == Some(true) {
        bail!("{} is an encrypted {format} image: decrypt it first (`qemu-img convert`)", path.display());
    }
    let virtual_size = info
        .get("virtual-size")
        .and_then(|s| s.as_u64())
        .with_context(|| format!("qemu-img info did not say {}'s virtual size", path.display()))?;
    if format.checkable() {
        check(&path, format)?;
    }
    // Every extent of data must lie inside the file: a truncated image (that qemu-img check
    // does not catch for every format) would otherwise read as zeros where data was.
    {
        let map = qemu_img(&["map", "--output=json", "-f", format.qemu()], &path)
            .with_context(|| format!("{} is not a readable {format} image", path.display()))?;
        let map: Vec<serde_json::Value> = serde_json::from_str(&map).context("qemu-img map printed no JSON")?;
        for extent in &map {
            let data = extent.get("data").and_then(|d| d.as_bool()) == Some(true);
            let (Some(offset), Some(length)) =
                (extent.get("offset").and_then(|o| o.as_u64()), extent.get("length").and_then(|l| l.as_u64()))
            else {
                continue;
            };
            if data && offset.saturating_add(length) > len {
                bail!(
                    "{} is truncated: the {format} image keeps data at bytes {offset}..{} of the file, which has {len}",
                    path.display(),
                    offset + length
                );
            }
        }
    }
    Ok(Image { path, format, virtual_size })
}

/// `qemu-img check`: corruption refuses the image; leaked clusters (space lost, data
/// intact) do not.
fn check(path: &Path, format: Format) -> Result<()> {
    let output = std::process::Command::new("qemu-img")
        .args(["check", "-f", format.qemu()])
        .arg(path)
        .output()
        .context("running qemu-img (install the qemu-utils package)")?;
    // Its first error, and how many more there were.
    let said = || {
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let errors: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("ERROR")).collect();
        match errors.as_slice() {
            [] => lines.last().copied().unwrap_or("no reason given").to_string(),
            [one] => one.to_string(),
            [first, more @ ..] => format!("{first}, and {} more errors", more.len()),
        }
    };
    match output.status.code() {
        Some(0) | Some(3) | Some(63) => Ok(()),
        Some(2) => bail!("{} is a corrupt {format} image (qemu-img check: {})", path.display(), said()),
        _ => bail!("{} is not a readable {format} image (qemu-img check: {})", path.display(), said()),
    }
}

/// Runs `qemu-img ARGS PATH` and returns what it printed, or its error.
fn qemu_img(args: &[&str], path: &Path) -> Result<String> {
    let output = std::process::Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .context("running qemu-img (install the qemu-utils package)")?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        let first = said.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no reason given");
        bail!("{}", first.trim_start_matches("qemu-img: "));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// How much each read takes from the image.
const CHUNK_BYTES: usize = 1 << 20;

/// The raw disk `image` describes, chunk by chunk, read ahead of the caller by a few
/// chunks. A read error ends the stream with that error.
pub struct Chunks {
    receiver: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
}

impl futures_util::Stream for Chunks {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

/// Starts reading `image`: its own bytes when raw, else through a `qemu-nbd` of its own.
pub async fn read(image: &Image) -> Result<Chunks> {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let size = image.virtual_size;
    if image.format == Format::Raw {
        let mut file =
            tokio::fs::File::open(&image.path).await.with_context(|| format!("opening {}", image.path.display()))?;
        tokio::spawn(async move {
            let mut offset = 0u64;
            while offset < size {
                let mut chunk = vec![0u8; CHUNK_BYTES.min((size - offset) as usize)];
                let read = file.read_exact(&mut chunk).await.map(|_| Bytes::from(chunk));
                let failed = read.is_err();
                if sender.send(read).await.is_err() || failed {
                    return;
                }
                offset += CHUNK_BYTES as u64;
            }
        });
        return Ok(Chunks { receiver });
    }
    let mut server = NbdServer::start(image).await?;
    let mut client = server.connect().await?;
    if client.size() != size {
        bail!("qemu-nbd exports {} bytes of {}, qemu-img info said {size}", client.size(), image.path.display());
    }
    tokio::spawn(async move {
        let _server = server;
        let mut offset = 0u64;
        while offset < size {
            let mut chunk = vec![0u8; CHUNK_BYTES.min((size - offset) as usize)];
            let read = client.read(offset, &mut chunk).await.map(|_| Bytes::from(chunk));
            let failed = read.is_err();
            if sender.send(read).await.is_err() || failed {
                return;
            }
            offset += CHUNK_BYTES as u64;
        }
        let _ = client.disconnect().await;
    });
    Ok(Chunks { receiver })
}

/// A `qemu-nbd` serving one image read-only on a socket in a private directory; killed
/// and its directory removed when dropped.
struct NbdServer {
    process: tokio::process::Child,
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl NbdServer {
    async fn start(image: &Image) -> Result<NbdServer> {
        let dir = tempfile::Builder::new().prefix("converge-import-").tempdir().context("making a socket directory")?;
        let socket = dir.path().join("nbd.sock");
        let process = tokio::process::Command::new("qemu-nbd")
            .args(["--read-only", "--shared=1", "--format", image.format.qemu(), "--socket"])
            .arg(&socket)
            .arg(&image.path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running qemu-nbd (install the qemu-utils package)")?;
        Ok(NbdServer { process, dir, path: image.path.clone() })
    }

    /// Connects once the socket is there (qemu-nbd makes it when the image is open).
    async fn connect(&mut self) -> Result<nbd::Client> {
        let socket = self.dir.path().join("nbd.sock");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.process.try_wait()? {
                let mut said = String::new();
                if let Some(mut stderr) = self.process.stderr.take() {
                    let _ = stderr.read_to_string(&mut said).await;
                }
                bail!("qemu-nbd could not serve {} ({status}): {}", self.path.display(), said.trim());
            }
            if socket.exists() {
                return nbd::Client::connect(&socket)
                    .await
                    .with_context(|| format!("reading {} through qemu-nbd", self.path.display()));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("qemu-nbd did not open {} within 30 s", self.path.display());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0x5a; HEAD_BYTES];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    #[test]
    fn each_format_is_told_by_its_header_and_a_made_up_one_by_none() {
        let tail = [0u8; TAIL_BYTES];
        assert_eq!(detect(&head_with(0, b"QFI\xfb\0\0\0\x03"), &tail), Ok(Format::Qcow2));
        assert_eq!(detect(&head_with(0, b"KDMV"), &tail), Ok(Format::Vmdk));
        let descriptor = detect(&head_with(0, b"# Disk DescriptorFile\n"), &tail).unwrap_err();
        assert!(descriptor.contains("names other files"), "{descriptor}");
        assert_eq!(detect(&head_with(0, b"vhdxfile"), &tail), Ok(Format::Vhdx));
        assert_eq!(detect(&head_with(0x40, &[0x7f, 0x10, 0xda, 0xbe]), &tail), Ok(Format::Vdi));
        assert_eq!(detect(&head_with(0, b"conectix"), &tail), Ok(Format::Vhd));
        // A fixed VHD: raw bytes (here even an MBR) and the footer at the end.
        let mut footer = [0u8; TAIL_BYTES];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(detect(&head_with(510, &[0x55, 0xaa]), &footer), Ok(Format::Vhd));

        assert_eq!(detect(&head_with(510, &[0x55, 0xaa]), &tail), Ok(Format::Raw), "an MBR");
        assert_eq!(detect(&head_with(512, b"EFI PART"), &tail), Ok(Format::Raw), "a GPT");
        assert_eq!(detect(&head_with(1080, &[0x53, 0xef]), &tail), Ok(Format::Raw), "a bare ext4");
        assert_eq!(detect(&head_with(32769, b"CD001"), &tail), Ok(Format::Raw), "an ISO");
        assert_eq!(detect(&vec![0u8; HEAD_BYTES], &tail), Ok(Format::Raw), "a blank disk");
        assert_eq!(detect(&[0u8; 100], &[]), Ok(Format::Raw), "a short blank file");

        let refused = detect(&head_with(0, b"MADEUP!!"), &tail).unwrap_err();
        assert!(refused.contains("4d414445555021") && refused.contains(SUPPORTED), "{refused}");
        assert!(detect(&head_with(1, b"QFI\xfb"), &tail).is_err(), "a magic only counts in its place");
        assert!(detect(&[], &[]).is_ok(), "an empty file is a blank disk of no bytes");
    }
}
