//! One TLS record and one system call for a small HTTP/1.1 response instead of two of each. pingora's HTTP/1.1
//! writer writes a response's head and its body separately, and a TLS stream seals a record and writes it to the
//! socket on every write; on streams without a write buffer of their own (ours: we accept connections
//! ourselves, and pingora keeps its buffer setter private) a small response goes out as two records in two
//! segments, which costs the edge, the kernel and the client. [`Coalesced`] holds back the first write after a
//! read (the head of the response to the request just read) until the next write or flush, and sends both as one
//! vectored write, which rustls seals as one record.
//!
//! Nothing waits on the holding: pingora flushes wherever a peer needs the bytes now (after a head without a
//! content length or a 1xx, at the end of every body, after each chunk), the next read releases a held head
//! first, and shutdown and drop release it too.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, TimingDigest, UniqueID,
    UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A held write is at most this big: response heads are, and larger writes gain nothing from it.
const HOLD_AT_MOST: usize = 4096;

/// A stream that sends a response's head together with what is written next.
#[derive(Debug)]
pub(crate) struct Coalesced<S> {
    inner: S,
    /// Written by the caller, not yet passed to `inner`.
    held: Vec<u8>,
    /// The last operation was a read, so the next write starts a response.
    after_read: bool,
}

impl<S> Coalesced<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self { inner, held: Vec::new(), after_read: true }
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Passes what is held to `inner`.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A peer waiting for what is held must not also be kept waiting by our read; if the socket is full the
        // write side is retried at the next write or flush.
        if !this.held.is_empty()
            && let Poll::Ready(Err(e)) = this.poll_release(cx)
        {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.after_read = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.held.is_empty() {
            let hold = std::mem::replace(&mut this.after_read, false);
            if hold && !buf.is_empty() && buf.len() <= HOLD_AT_MOST {
                this.held.extend_from_slice(buf);
                return Poll::Ready(Ok(buf.len()));
            }
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        while !this.held.is_empty() {
            let both = [IoSlice::new(&this.held), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held = this.held.len();
            if n > held {
                this.held.clear();
                return Poll::Ready(Ok(n - held));
            }
            this.held.drain(..n);
        }
        // Exactly what was held went out: `buf` goes on its own.
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S> Drop for Coalesced<S> {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            tracing::debug!(bytes = self.held.len(), "a connection closed with a response head not sent");
        }
    }
}

#[async_trait]
impl<S: Shutdown + AsyncWrite + Unpin + Send> Shutdown for Coalesced<S> {
    async fn shutdown(&mut self) {
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            let _ = self.inner.write_all(&held).await;
            let _ = self.inner.flush().await;
        }
        Shutdown::shutdown(&mut self.inner).await;
    }
}

impl<S: UniqueID> UniqueID for Coalesced<S> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl<S: Ssl> Ssl for Coalesced<S> {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl<S: GetTimingDigest> GetTimingDigest for Coalesced<S> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl<S: GetProxyDigest> GetProxyDigest for Coalesced<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl<S: GetSocketDigest> GetSocketDigest for Coalesced<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl<S: Peek + Send> Peek for Coalesced<S> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the writes that reach the inner stream.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        to_read: Vec<u8>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let n = self.to_read.len().min(buf.remaining());
            buf.put_slice(&self.to_read[..n]);
            self.to_read.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len();
            self.writes.push(all);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_head_and_its_body_go_out_as_one_write_and_later_writes_pass_straight() {
        let mut s = Coalesced::new(Recorder { to_read: b"GET / HTTP/1.1\r\n\r\n".to_vec(), ..Default::default() });
        let mut req = [0u8; 64];
        let _ = s.read(&mut req).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert!(s.inner.writes.is_empty(), "the head is held until the body comes");
        s.write_all(b"hello").await.unwrap();
        s.write_all(b" world").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.inner.writes, vec![b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec(), b" world".to_vec()]);
    }

    #[tokio::test]
    async fn a_flush_or_a_shutdown_sends_a_held_head_alone() {
        let mut s = Coalesced::new(Recorder::default());
        s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.inner.writes, vec![b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()]);

        let mut s = Coalesced::new(Recorder::default());
        s.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        AsyncWriteExt::shutdown(&mut s).await.unwrap();
        assert_eq!(s.inner.writes, vec![b"HTTP/1.1 200 OK\r\n".to_vec()]);
    }

    #[tokio::test]
    async fn a_large_write_is_never_held() {
        let mut s = Coalesced::new(Recorder::default());
        let big = vec![b'x'; HOLD_AT_MOST + 1];
        s.write_all(&big).await.unwrap();
        assert_eq!(s.inner.writes, vec![big]);
    }
}
