//! `instance exec`'s wire format: binary WebSocket messages whose first byte says what the rest is, as
//! Kubernetes' `channel.k8s.io` does. The same frames go from the client to the API and from the API to the node,
//! so the API relays them without reading more than their first byte.

/// One message of an exec stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes for the command's standard input (client to node).
    Stdin(Vec<u8>),
    /// The command's standard input is at its end (client to node).
    StdinClosed,
    /// The terminal's new size (client to node; TTY sessions only).
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// Bytes of its standard output (or of its terminal) (node to client).
    Stdout(Vec<u8>),
    /// Bytes of its standard error (node to client).
    Stderr(Vec<u8>),
    /// It ended with this code; the last frame (node to client). A signal `n` is `128 + n`, as shells say it.
    Exit(i32),
    /// It could not run; the last frame (node or API to client).
    Error(String),
}

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const EXIT: u8 = 5;
const STDIN_CLOSED: u8 = 6;

/// A message that is not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an exec frame (channel {channel:?}, {len} bytes)")]
pub struct FrameError {
    /// Its first byte, if any.
    pub channel: Option<u8>,
    /// Its length.
    pub len: usize,
}

impl Frame {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let with = |channel: u8, rest: &[u8]| [&[channel][..], rest].concat();
        match self {
            Self::Stdin(b) => with(STDIN, b),
            Self::StdinClosed => vec![STDIN_CLOSED],
            Self::Resize { cols, rows } => with(RESIZE, &[cols.to_be_bytes(), rows.to_be_bytes()].concat()),
            Self::Stdout(b) => with(STDOUT, b),
            Self::Stderr(b) => with(STDERR, b),
            Self::Exit(code) => with(EXIT, &code.to_be_bytes()),
            Self::Error(text) => with(ERROR, text.as_bytes()),
        }
    }

    /// Reads a message.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let bad = || FrameError { channel: bytes.first().copied(), len: bytes.len() };
        let (&channel, rest) = bytes.split_first().ok_or_else(bad)?;
        Ok(match channel {
            STDIN => Self::Stdin(rest.to_vec()),
            STDIN_CLOSED if rest.is_empty() => Self::StdinClosed,
            RESIZE => match rest {
                [c0, c1, r0, r1] => {
                    Self::Resize { cols: u16::from_be_bytes([*c0, *c1]), rows: u16::from_be_bytes([*r0, *r1]) }
                }
                _ => return Err(bad()),
            },
            STDOUT => Self::Stdout(rest.to_vec()),
            STDERR => Self::Stderr(rest.to_vec()),
            EXIT => Self::Exit(i32::from_be_bytes(rest.try_into().map_err(|_| bad())?)),
            ERROR => Self::Error(String::from_utf8_lossy(rest).into_owned()),
            _ => return Err(bad()),
        })
    }

    /// Whether the client may send it (the API relays nothing else to a node).
    pub fn from_client(&self) -> bool {
        matches!(self, Self::Stdin(_) | Self::StdinClosed | Self::Resize { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        for f in [
            Frame::Stdin(b"ls\n".to_vec()),
            Frame::StdinClosed,
            Frame::Resize { cols: 132, rows: 43 },
            Frame::Stdout(vec![0, 255]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(-1),
            Frame::Exit(130),
            Frame::Error("no such instance".into()),
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f.clone()), "{f:?}");
        }
        for bad in [&[][..], &[9], &[RESIZE, 1, 2, 3], &[EXIT, 0], &[STDIN_CLOSED, 1]] {
            assert!(Frame::decode(bad).is_err(), "{bad:?}");
        }
        assert!(Frame::Stdin(vec![]).from_client() && !Frame::Exit(0).from_client());
    }
}
