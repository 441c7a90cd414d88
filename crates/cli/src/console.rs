//! `vm console`: an interactive session on a VM's serial console. On a terminal, keys go to
//! the guest as they are typed (the terminal is raw until the session ends, however it
//! ends); from a pipe, its bytes go as they come. Ctrl-] leaves; so does the VM stopping.

use anyhow::{Context, Result};
use api::client::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use std::io::Write;
use tokio::io::AsyncReadExt;

/// The key that ends a session (Ctrl-], as telnet and virsh have it).
const LEAVE: u8 = 0x1d;

/// A terminal put in raw mode, put back as it was when dropped.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// Raw mode for stdin, if it is a terminal.
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

pub async fn interactive(api: &Client, name: &str) -> Result<()> {
    let session = api.console_session(name).await?;
    eprintln!("Connected to the serial console of VM {name}; Ctrl-] leaves.");
    let raw = RawTerminal::enter();
    let input = session.input;
    // Set before the session is closed on Ctrl-]: whatever the connection does after that
    // (a server may drop it without a closing handshake) is the end the user asked for.
    let leaving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let left = leaving.clone();
    let keys = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            let typed = &buf[..n];
            let leave = typed.iter().position(|b| *b == LEAVE);
            let send = &typed[..leave.unwrap_or(n)];
            if !send.is_empty() && input.send(Bytes::copy_from_slice(send)).await.is_err() {
                return false;
            }
            if leave.is_some() {
                left.store(true, std::sync::atomic::Ordering::SeqCst);
                return true;
            }
        }
    });
    let mut output = session.output;
    let mut stdout = std::io::stdout();
    let mut keys = std::pin::pin!(keys);
    let mut keyboard_open = true;
    let ended: Result<&str> = loop {
        tokio::select! {
            biased;
            left = &mut keys, if keyboard_open => match left {
                Ok(true) => break Ok("left"),
                // Input ended (a pipe ran dry): keep showing the output until the VM stops.
                _ => keyboard_open = false,
            },
            chunk = output.next() => match chunk {
                Some(Ok(bytes)) => {
                    stdout.write_all(&bytes).context("writing to the terminal")?;
                    stdout.flush().context("writing to the terminal")?;
                }
                Some(Err(_)) if leaving.load(std::sync::atomic::Ordering::SeqCst) => break Ok("left"),
                Some(Err(e)) => break Err(e.into()),
                None => break Ok("the VM stopped"),
            },
        }
    };
    drop(raw);
    if matches!(ended, Ok("left")) {
        // Keys typed with Ctrl-] (a pasted line) go before the session closes.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), session.sent).await;
    }
    let ended = ended?;
    eprintln!("\r\n[{name}: {ended}]");
    Ok(())
}
