//! `cloudctl instance exec`: a command in an instance's sandbox over a WebSocket through the API, interactive on a
//! terminal (raw mode, its size passed on and kept current), its exit code cloudctl's own.

use anyhow::bail;
use cloud_domain::exec::Frame;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Client, seg};

/// The terminal in raw mode until dropped: keys go to the command as typed, and the instance's terminal echoes.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enable() -> anyhow::Result<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let saved = tcgetattr(std::io::stdin())?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(std::io::stdin(), SetArg::TCSANOW, &raw)?;
        Ok(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

/// This terminal's size, as the instance's terminal should have it.
fn size() -> (u16, u16) {
    terminal_size::terminal_size().map_or((80, 24), |(w, h)| (w.0, h.0))
}

/// Runs `command` (a shell when empty) in the instance; returns its exit code.
pub(crate) async fn run(c: &Client, name: &str, command: &[String], tty: bool) -> anyhow::Result<i32> {
    let command = if command.is_empty() { vec!["/bin/sh".to_owned()] } else { command.to_vec() };
    let mut query = reqwest::Url::parse("http://query/")?;
    {
        let mut pairs = query.query_pairs_mut();
        for arg in &command {
            pairs.append_pair("command", arg);
        }
        if tty {
            let (cols, rows) = size();
            pairs
                .append_pair("tty", "true")
                .append_pair("cols", &cols.to_string())
                .append_pair("rows", &rows.to_string());
        }
    }
    let path = format!("/v1/instances/{}/exec?{}", seg(name), query.query().unwrap_or_default());
    let (mut to_api, mut from_api) = c.websocket(&path).await?.split();
    let _raw = if tty { Some(RawMode::enable()?) } else { None };

    // Standard input in its own task: a read in progress cannot be cancelled, and needs not be.
    let (input_tx, mut input) = tokio::sync::mpsc::channel::<Frame>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 8192];
        loop {
            let frame = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => Frame::StdinClosed,
                Ok(n) => Frame::Stdin(buf[..n].to_vec()),
            };
            let last = frame == Frame::StdinClosed;
            if input_tx.send(frame).await.is_err() || last {
                return;
            }
        }
    });
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    loop {
        tokio::select! {
            message = from_api.next() => match message {
                Some(Ok(Message::Binary(bytes))) => match Frame::decode(&bytes) {
                    Ok(Frame::Stdout(data)) => {
                        stdout.write_all(&data).await?;
                        stdout.flush().await?;
                    }
                    Ok(Frame::Stderr(data)) => {
                        stderr.write_all(&data).await?;
                        stderr.flush().await?;
                    }
                    Ok(Frame::Exit(code)) => return Ok(code),
                    Ok(Frame::Error(why)) => bail!("exec in {name}: {why}"),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => bail!("exec in {name}: the connection ended before the command did"),
                Some(Err(e)) => bail!("exec in {name}: {e}"),
                Some(Ok(_)) => {}
            },
            Some(frame) = input.recv() => {
                to_api.send(Message::binary(frame.encode())).await?;
            }
            _ = resized.recv(), if tty => {
                let (cols, rows) = size();
                to_api.send(Message::binary(Frame::Resize { cols, rows }.encode())).await?;
            }
        }
    }
}
