//! A control connection: length-delimited frames of [`Msg`] over TCP with a
//! bounded frame size and a timeout on every read.
//!
//! Owns: framing and the mapping of I/O failures to [`ConnError`]. Must not:
//! decide anything about the session (the cores do).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::wire::control::{self, ControlError, Msg, MAX_FRAME};

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("connection closed by peer")]
    Closed,
    #[error("no message within {0:?}")]
    Timeout(Duration),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ControlError),
}

pub type FrameSink =
    futures_util::stream::SplitSink<Framed<TcpStream, LengthDelimitedCodec>, bytes::Bytes>;
pub type FrameStream = futures_util::stream::SplitStream<Framed<TcpStream, LengthDelimitedCodec>>;

pub struct Conn {
    framed: Framed<TcpStream, LengthDelimitedCodec>,
}

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .length_field_length(4)
        .new_codec()
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn {
            framed: Framed::new(stream, codec()),
        }
    }

    pub async fn send(&mut self, msg: &Msg) -> Result<(), ConnError> {
        let bytes = control::emit(msg)?;
        SinkExt::<bytes::Bytes>::send(&mut self.framed, bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Next message, or an error: closed, timed out, oversize (the codec
    /// refuses the length before allocating) or malformed.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Msg, ConnError> {
        match tokio::time::timeout(timeout, self.framed.next()).await {
            Err(_) => Err(ConnError::Timeout(timeout)),
            Ok(None) => Err(ConnError::Closed),
            Ok(Some(Err(e))) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    Err(ConnError::Protocol(ControlError::Oversize(MAX_FRAME + 1)))
                } else {
                    Err(ConnError::Io(e))
                }
            }
            Ok(Some(Ok(frame))) => Ok(control::parse(&frame)?),
        }
    }

    /// Best effort: tell the peer why we are closing, then close.
    pub async fn close_with_error(mut self, message: String) {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.send(&Msg::Error { message })).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            SinkExt::<bytes::Bytes>::close(&mut self.framed),
        )
        .await;
    }

    /// Separate halves, for a reader and a writer running at once.
    pub fn split(self) -> (FrameSink, FrameStream) {
        self.framed.split()
    }
}
