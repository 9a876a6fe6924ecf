//! Reading the API's Server-Sent Event streams block by block, comments included, as the tests look at them.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;

/// One block of a stream (the lines up to an empty line).
#[derive(Debug, Default, Clone)]
pub struct Block {
    pub comments: Vec<String>,
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
}

impl Block {
    /// The data as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.data.as_deref().expect("an event with data")).expect("data is JSON")
    }

    /// The id as a number.
    #[track_caller]
    pub fn seq(&self) -> i64 {
        self.id.as_deref().expect("an id").parse().expect("a numeric id")
    }
}

/// A stream being read. The API ends blocks with "\n\n"; any other line ending would fail these tests' parse,
/// which is the point: they check what the API sends.
pub struct Reader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buf: Vec<u8>,
    /// The blocks without data that [`Reader::event`] skipped, in order.
    pub skipped: Vec<Block>,
}

impl Reader {
    #[track_caller]
    pub fn new(res: reqwest::Response) -> Self {
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Self { body: Box::pin(res.bytes_stream().map(|c| c.map(|b| b.to_vec()))), buf: Vec::new(), skipped: Vec::new() }
    }

    /// The next block, waiting until `deadline`; `None` when the stream ends.
    pub async fn block_until(&mut self, deadline: Instant) -> Option<Block> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = std::str::from_utf8(&raw).expect("UTF-8 blocks");
                let mut block = Block::default();
                for line in text.lines().filter(|l| !l.is_empty()) {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                    match field {
                        "" => block.comments.push(value),
                        "id" => block.id = Some(value),
                        "event" => block.event = Some(value),
                        "data" => block.data = Some(value),
                        other => panic!("unexpected field {other:?} in {text:?}"),
                    }
                }
                return Some(block);
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await.expect("the stream stalled") {
                Some(chunk) => self.buf.extend_from_slice(&chunk.expect("reading the stream")),
                None => return None,
            }
        }
    }

    /// The next block within 30 s; panics when the stream ends.
    pub async fn block(&mut self) -> Block {
        self.block_until(Instant::now() + Duration::from_secs(30)).await.expect("the stream ended")
    }

    /// The next block carrying data (skipping comments and id-only blocks), within 30 s.
    pub async fn event(&mut self) -> Block {
        loop {
            let b = self.block().await;
            if b.data.is_some() {
                return b;
            }
            self.skipped.push(b);
        }
    }

    /// Whether the stream ends within 30 s, skipping comments; panics at an event.
    pub async fn ends(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(b) = self.block_until(deadline).await {
            assert!(b.data.is_none(), "an event instead of the end: {b:?}");
        }
        true
    }
}
