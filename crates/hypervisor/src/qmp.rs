//! A QEMU process's monitor, through the `qapi` crate.

use futures_util::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::WriteHalf;
use tokio::net::UnixStream;

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

/// How long QEMU may take to open its monitor socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Qmp {
    service: Service,
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QEMU's monitor at {path} did not open within {timeout_s} s")]
    Connect {
        path: String,
        timeout_s: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {command} failed")]
    Command {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let started = Instant::now();
        let negotiation = loop {
            match QmpStreamTokio::open_uds(path).await {
                Ok(negotiation) => break negotiation,
                Err(e) if started.elapsed() > CONNECT_TIMEOUT => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        timeout_s: CONNECT_TIMEOUT.as_secs(),
                        source: e,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let stream = negotiation
            .negotiate()
            .await
            .map_err(|source| QmpError::Command { command: "qmp_capabilities", source })?;
        let (service, mut events) = stream.into_parts();
        // Replies arrive through the event half: it must be polled for commands to finish.
        // QEMU's exit is watched on the process itself, so events are only logged.
        tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                tracing::debug!(?event, "QMP event");
            }
        });
        Ok(Qmp { service })
    }

    /// Presses the ACPI power button.
    pub async fn powerdown(&self) -> Result<(), QmpError> {
        let result = self.service.execute(qmp::system_powerdown {}).await;
        result
            .map(drop)
            .map_err(|e| QmpError::Command { command: "system_powerdown", source: std::io::Error::other(e) })
    }

    /// Has QEMU send a few broadcast frames from each NIC's address (as after a migration),
    /// so the network's bridges and overlays learn at once where the VM runs now.
    pub async fn announce(&self) -> Result<(), QmpError> {
        // QEMU's own defaults: 5 rounds, 50 ms apart and growing by 100 ms.
        let parameters =
            qmp::AnnounceParameters { id: None, interfaces: None, initial: 50, max: 550, rounds: 5, step: 100 };
        let result = self.service.execute(qmp::announce_self(parameters)).await;
        result.map(drop).map_err(|e| QmpError::Command { command: "announce-self", source: std::io::Error::other(e) })
    }

    /// Ends QEMU at once. It may close the socket before it answers; that is success too.
    pub async fn quit(&self) {
        let _ = self.service.execute(qmp::quit {}).await;
    }
}
