//! The response body of an ECDS stream, written by hand rather than by a
//! tonic codec: a codec encodes each message into a buffer of its own, so
//! every stream, stalled ones included, would hold a copy of the whole table
//! (86 MB at a million tokens). Here each response goes to HTTP/2 as three
//! chunks, the gRPC message header with the bytes before the payload, the
//! shared payload itself (a reference to the published snapshot), and the
//! bytes after it: a client that never reads costs a reference, not a copy.
//! hyper polls a body only when the stream has flow-control capacity, and the
//! stream task waits on a short channel, so a stalled stream holds at most a
//! few references.

use super::resource::Frame;
use bytes::Bytes;
use http_body::Frame as BodyFrame;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::Status;

/// A published payload as bytes HTTP/2 can send without copying.
struct Shared(Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// The chunks of one gRPC message: the 5-byte length prefix (uncompressed)
/// with the frame's head, the shared payload, the tail.
fn chunks(frame: Frame) -> [Bytes; 3] {
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    let mut head = Vec::with_capacity(5 + frame.head.len());
    head.push(0);
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(&frame.head);
    [
        Bytes::from(head),
        Bytes::from_owner(Shared(frame.payload)),
        Bytes::from(frame.tail),
    ]
}

/// The body: the frames a stream task sends, then the gRPC status as
/// trailers (OK when the task ends, or the error it sent last).
pub(crate) struct FrameBody {
    rx: mpsc::Receiver<Result<Frame, Status>>,
    queued: VecDeque<Bytes>,
    done: bool,
}

impl FrameBody {
    pub(crate) fn new(rx: mpsc::Receiver<Result<Frame, Status>>) -> Self {
        Self {
            rx,
            queued: VecDeque::new(),
            done: false,
        }
    }

    fn trailers(&mut self, status: &Status) -> Poll<Option<Result<BodyFrame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = tonic::codegen::http::HeaderMap::with_capacity(3);
        match status.add_header(&mut trailers) {
            Ok(()) => Poll::Ready(Some(Ok(BodyFrame::trailers(trailers)))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<BodyFrame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(chunk) = this.queued.pop_front() {
            return Poll::Ready(Some(Ok(BodyFrame::data(chunk))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let [first, payload, tail] = chunks(frame);
                this.queued
                    .extend([payload, tail].into_iter().filter(|b| !b.is_empty()));
                Poll::Ready(Some(Ok(BodyFrame::data(first))))
            }
            Poll::Ready(Some(Err(status))) => this.trailers(&status),
            Poll::Ready(None) => this.trailers(&Status::ok("")),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queued.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn messages_share_the_payload_and_end_with_a_status() {
        let payload = Arc::new(vec![7u8; 100_000]);
        let (tx, rx) = mpsc::channel(4);
        for _ in 0..2 {
            tx.send(Ok(Frame {
                head: vec![1, 2],
                payload: Arc::clone(&payload),
                tail: vec![3],
            }))
            .await
            .unwrap();
        }
        drop(tx);
        let mut body = FrameBody::new(rx);
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(chunk) => {
                    if chunk.len() == payload.len() {
                        // The very bytes of the snapshot, not a copy.
                        assert_eq!(chunk.as_ptr(), payload.as_ptr());
                    }
                    data.extend_from_slice(&chunk);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let message_len = 2 + payload.len() + 1;
        assert_eq!(data.len(), 2 * (5 + message_len));
        assert_eq!(data[0], 0, "not compressed");
        assert_eq!(u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize, message_len);
        assert_eq!(&data[5..7], &[1, 2]);
        assert_eq!(data[5 + message_len - 1], 3);
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_with_its_status() {
        let (tx, rx) = mpsc::channel(1);
        tx.send(Err(Status::invalid_argument("no node"))).await.unwrap();
        let mut body = FrameBody::new(rx);
        let trailers = body.frame().await.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "3");
        assert!(body.frame().await.is_none());
    }
}
